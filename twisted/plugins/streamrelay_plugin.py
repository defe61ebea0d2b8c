from twisted.application.service import ServiceMaker

streamrelay = ServiceMaker(
    "streamrelay",
    "streamrelay.tap",
    "Live-video relay: desktop publishers to browser viewers over WebSocket.",
    "streamrelay",
)
