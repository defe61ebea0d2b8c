"""A WebSocket client's parts shared by the publisher and the relay's own client (the
viewer library and an edge's pulls): reconnect backoff (:mod:`.backoff`), relay URLs
(:mod:`.target`), TCP and TLS endpoints (:mod:`.endpoint`) and the Autobahn client
connection that reports to a listener (:mod:`.connection`).  Neither the publisher nor the
relay is imported here: both import this, so the relay never loads the publisher package.
"""
