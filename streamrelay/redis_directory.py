"""The cluster directory in Redis (``--cluster redis://HOST:PORT/DB``, or under Sentinel
``redis+sentinel://HOST:PORT,HOST:PORT/MASTER/DB``): a thin adapter
implementing :class:`~streamrelay.directory.DirectoryStore` with ``txredisapi``.

Keys, all under ``streamrelay:{CLUSTER}:`` (``--cluster-name``):

- ``node:URL`` -- a node's advertised URL, ``PX`` 3 s, set by every heartbeat;
- ``stream:NAME`` -- ``EPOCH URL``, the stream's origin, ``PX`` 3 s, refreshed by the
  origin's heartbeat;
- ``epoch`` -- the fencing counter (``INCR``); a heartbeat raises it back above every
  epoch still held, should Redis have restarted empty;
- channel ``origins`` -- ``NAME EPOCH URL`` on a claim, ``NAME -`` on a release.

Each operation is one Lua script (atomic, one round trip): a claim, a compare-and-delete,
and the heartbeat of every stream a node holds together.  Connections reconnect by
themselves (within a second); the subscriber subscribes again on each connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger

from streamrelay.config import parse_cluster_address
from streamrelay.directory import TTL_SECONDS, Origin

_log = Logger()

CONNECT_TIMEOUT_SECONDS = 2

# KEYS: epoch counter, stream key.  ARGV: ttl ms, node, channel, name, takeover (1/0).
CLAIM = """
if ARGV[5] == '0' then
  local value = redis.call('GET', KEYS[2])
  if value then
    local space = string.find(value, ' ')
    if space and string.sub(value, space + 1) ~= ARGV[2] then return 0 end
  end
end
local epoch = redis.call('INCR', KEYS[1])
local current = redis.call('GET', KEYS[2])
local theirs = current and tonumber(string.match(current, '^(%d+)')) or 0
if theirs >= epoch then
  -- Redis restarted empty and the counter is behind an entry re-registered since.
  epoch = theirs + 1
  redis.call('SET', KEYS[1], epoch)
end
local value = epoch .. ' ' .. ARGV[2]
redis.call('SET', KEYS[2], value, 'PX', ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. value)
return epoch
"""

# KEYS: stream key.  ARGV: epoch, channel, name.
RELEASE = """
local value = redis.call('GET', KEYS[1])
if value and tonumber(string.match(value, '^(%d+)')) == tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ' -')
  return 1
end
return 0
"""

# KEYS: node key, epoch counter, stream keys...  ARGV: ttl ms, node, epochs...
# Answers the flat list NAME_KEY, VALUE of the streams a newer claim took.
HEARTBEAT = """
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
local lost = {}
local top = 0
for i = 3, #KEYS do
  local mine = tonumber(ARGV[i])
  local value = redis.call('GET', KEYS[i])
  local theirs = value and tonumber(string.match(value, '^(%d+)')) or 0
  local node = value and string.match(value, '^%d+ (.*)$') or ''
  -- Equal epochs (two claims across a Redis restart): the greater node URL wins.
  if theirs > mine or (theirs == mine and node > ARGV[2]) then
    table.insert(lost, KEYS[i])
    table.insert(lost, value)
  else
    redis.call('SET', KEYS[i], mine .. ' ' .. ARGV[2], 'PX', ARGV[1])
    if mine > top then top = mine end
  end
end
if top > tonumber(redis.call('GET', KEYS[2]) or '0') then
  redis.call('SET', KEYS[2], top)
end
return lost
"""


class _Factory(txredisapi.RedisFactory):  # type: ignore[misc]
    # Back within about a second of Redis returning (the default waits up to 10 s).
    initialDelay = 0.2
    maxDelay = 1.0


class _SubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    def connectionMade(self) -> Any:  # noqa: N802 (Twisted API)
        """Subscribe on every (re)connection: a subscription dies with its link."""
        result = super().connectionMade()
        ready = self.whenConnected()
        ready.addCallback(lambda _: self.subscribe(self.factory.channel))
        ready.addErrback(lambda failure: None)
        return result

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:  # noqa: N802
        """Hand the notification to the store."""
        self.factory.deliver(message)


class _SubscriberFactory(_Factory):
    protocol = _SubscriberProtocol

    def __init__(
        self, channel: str, deliver: Callable[[Any], None], credentials: dict[str, Any]
    ) -> None:
        super().__init__(
            None, None, 1, isLazy=True, handler=txredisapi.ConnectionHandler, **credentials
        )
        self.channel = channel
        self.deliver = deliver


class _SentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    # The master's address is asked of the Sentinels at every (re)connection.
    maxDelay = 1.0


class _SentinelSubscriberFactory(_SentinelFactory):
    # On the master too, found again at each reconnection; what a subscription on a
    # demoted master misses, the periodic re-reads of the directory catch.
    protocol = _SubscriberProtocol

    def __init__(self, channel: str, deliver: Callable[[Any], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channel = channel
        self.deliver = deliver


class RedisStore:
    """:class:`~streamrelay.directory.DirectoryStore` on one Redis server."""

    def __init__(
        self,
        reactor: Any,
        url: str,
        cluster: str,
        *,
        password: bytes | None = None,
        username: str = "",
    ) -> None:
        address = parse_cluster_address(url)
        # AUTH on every (re)connection, by txredisapi; the password is never logged (a
        # refused one is reported by Redis's own error text, which does not quote it).
        self._credentials: dict[str, Any] = {}
        if password is not None:
            self._credentials["password"] = password.decode("utf-8", "surrogateescape")
            if username:
                self._credentials["username"] = username
        self.reactor = reactor
        self.prefix = f"streamrelay:{cluster}:"
        self.channel = self.prefix + "origins"
        self.ttl_ms = str(int(TTL_SECONDS * 1000))
        self._master = address.master
        self._db = address.db
        self._subscriber: Any = None
        self._sentinel: Any = None
        if address.master is not None:
            # txredisapi's Sentinel client: it discovers the master before each connection.
            self._sentinel = txredisapi.Sentinel(list(address.hosts))
            self._factory = _SentinelFactory(
                sentinel_manager=self._sentinel, service_name=address.master,
                is_master=True, uuid=None, dbid=address.db, poolsize=1, isLazy=True,
                **self._credentials,
            )
            self._redis = self._sentinel._connect_factory_and_return_handler(self._factory)
            return
        host, port = address.hosts[0]
        self._endpoint = HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT_SECONDS)
        self._factory = _Factory(
            f"{host}:{port}", address.db, 1, isLazy=True, **self._credentials
        )
        self._factory.startConnecting(self._endpoint)
        self._redis = self._factory.handler

    def _stream_key(self, name: str) -> str:
        return self.prefix + "stream:" + name

    def claim(self, name: str, node: str, takeover: bool) -> defer.Deferred[Origin | None]:
        """One script: INCR the epoch, SET the entry with its TTL, PUBLISH."""
        keys = [self.prefix + "epoch", self._stream_key(name)]
        args = [self.ttl_ms, node, self.channel, name, "1" if takeover else "0"]
        called: defer.Deferred[Any] = self._redis.eval(CLAIM, keys, args)
        return called.addCallback(lambda epoch: Origin(node, int(epoch)) if epoch else None)

    def release(self, name: str, epoch: int) -> defer.Deferred[bool]:
        """Compare-and-delete: only while the entry still holds ``epoch``."""
        keys = [self._stream_key(name)]
        called: defer.Deferred[Any] = self._redis.eval(RELEASE, keys, [epoch, self.channel, name])
        return called.addCallback(bool)

    def heartbeat(self, node: str, held: dict[str, int]) -> defer.Deferred[dict[str, Origin]]:
        """The node and all its streams, refreshed in one script."""
        names = sorted(held)
        keys = [self.prefix + "node:" + node, self.prefix + "epoch"]
        keys += [self._stream_key(name) for name in names]
        args = [self.ttl_ms, node] + [str(held[name]) for name in names]
        called: defer.Deferred[Any] = self._redis.eval(HEARTBEAT, keys, args)

        def lost(reply: list[Any]) -> dict[str, Origin]:
            taken: dict[str, Origin] = {}
            strip = len(self.prefix + "stream:")
            for key, value in zip(reply[::2], reply[1::2], strict=True):
                origin = Origin.decode(value)
                if origin is not None:
                    taken[_text(key)[strip:]] = origin
            return taken

        return called.addCallback(lambda reply: lost(reply or []))

    def lookup(self, names: list[str]) -> defer.Deferred[dict[str, Origin | None]]:
        """One MGET for all ``names``."""
        if not names:
            return defer.succeed({})
        called: defer.Deferred[Any] = self._redis.mget([self._stream_key(n) for n in names])
        return called.addCallback(
            lambda values: {name: Origin.decode(v) for name, v in zip(names, values, strict=True)}
        )

    @defer.inlineCallbacks
    def listing(self) -> Any:
        """SCAN the stream keys (bounded batches), then MGET them."""
        pattern = self._stream_key("*")
        cursor, names = 0, []
        strip = len(self._stream_key(""))
        while True:
            cursor, keys = yield self._redis.scan(cursor, pattern, 500)
            names += [_text(key)[strip:] for key in keys]
            if int(cursor) == 0:
                break
        origins = yield self.lookup(sorted(set(names)))
        return {name: origin for name, origin in origins.items() if origin is not None}

    def subscribe(self, notified: Callable[[str, Origin | None], None]) -> None:
        """Follow the ``origins`` channel (re-subscribed on every reconnection)."""

        def deliver(message: Any) -> None:
            name, _, rest = _text(message).partition(" ")
            notified(name, Origin.decode(rest))

        if self._sentinel is not None:
            self._subscriber = _SentinelSubscriberFactory(
                self.channel, deliver, sentinel_manager=self._sentinel,
                service_name=self._master, is_master=True, uuid=None, dbid=None,
                poolsize=1, isLazy=True, **self._credentials,
            )
            self._sentinel._connect_factory_and_return_handler(self._subscriber)
            return
        self._subscriber = _SubscriberFactory(self.channel, deliver, self._credentials)
        self._subscriber.startConnecting(self._endpoint)

    def close(self) -> defer.Deferred[None]:
        """Disconnect every connection (the Sentinels' too)."""
        factories = [self._factory] + ([self._subscriber] if self._subscriber else [])
        closing = [f.disconnect() for f in factories]
        if self._sentinel is not None:
            closing.append(self._sentinel.disconnect())
        done = defer.gatherResults(closing, consumeErrors=True)
        return done.addBoth(lambda _: None)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
