"""The relay's settings: one immutable :class:`RelayConfig`, each field declared once.

A field that ``twistd streamrelay`` can set carries a :class:`Setting` in its metadata: the
help text, how the command-line text becomes the value (and what it refuses), the option's
name when it differs from the field's, and for secrets the environment variable read when
the option is absent.  :mod:`streamrelay.tap` derives its ``usage.Options`` from these
declarations alone; a field that is not an option says so (:func:`derived`, :func:`fixed`).

(Over 400 lines: every option is one declaration, with its help text, here; splitting
them would scatter the one list the option table in docs/operations.md is generated from.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from streamrelay.tokens import read_secret_file

MIB = 1024 * 1024

_SETTING = "streamrelay.setting"
_DERIVED = "streamrelay.derived"
_FIXED = "streamrelay.fixed"


# -- what the command line accepts ------------------------------------------------------------
# Each raises ValueError with a message that quotes the text but never a secret.


def positive_int(text: str) -> int:
    """A whole number above zero."""
    number = _integer(text)
    if number <= 0:
        raise ValueError(f"{text!r} must be a positive integer")
    return number


def non_negative_int(text: str) -> int:
    """A whole number, zero included (zero meaning "no limit" or "off")."""
    number = _integer(text)
    if number < 0:
        raise ValueError(f"{text!r} must be zero or a positive integer")
    return number


def positive_seconds(text: str) -> float:
    """A finite duration above zero, in seconds."""
    return _positive_float(text, "a positive number of seconds")


def positive_rate(text: str) -> float:
    """A finite rate above zero, per second."""
    return _positive_float(text, "a positive number per second")


def origin_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of Origin patterns; blanks around items are dropped."""
    origins = tuple(item.strip() for item in text.split(",") if item.strip())
    for origin in origins:
        if any(character.isspace() for character in origin):
            raise ValueError(f"invalid origin pattern {origin!r}")
    return origins


# Where an upstream URL names the stream; a base URL (no path) gets /relay/{stream}.
STREAM_PLACEHOLDER = "{stream}"
RELAY_PATH_TEMPLATE = "/relay/" + STREAM_PLACEHOLDER


def upstream_urls(text: str) -> tuple[str, ...]:
    """Upstream relays, separated by commas or blanks (``--upstream`` may also be given
    more than once): each a ``ws://`` or ``wss://`` URL template holding ``{stream}``
    once, or a base URL with no path, which gets ``/relay/{stream}``.  No query string:
    the relay mints its tokens from ``--relay-secret-file``, never from the command line."""
    found = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        parts = urlsplit(item)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"{item!r} is not a ws:// or wss:// URL with a host")
        try:
            parts.port  # noqa: B018 -- urlsplit checks the port only when asked
        except ValueError:
            raise ValueError(f"{item!r} has a bad port") from None
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise ValueError(
                f"{item!r}: no query, fragment or credentials (tokens come from "
                "--relay-secret-file)"
            )
        if parts.path in ("", "/"):
            item = item.rstrip("/") + RELAY_PATH_TEMPLATE
        elif parts.path.count(STREAM_PLACEHOLDER) != 1:
            raise ValueError(f"{item!r} must hold {STREAM_PLACEHOLDER} once, or have no path")
        found.append(item)
    return tuple(found)


def cluster_url(text: str) -> str:
    """``redis://HOST[:PORT][/DB]``, or ``redis+sentinel://HOST:PORT,HOST:PORT/MASTER[/DB]``
    (Redis Sentinel): where the cluster directory is ("": no cluster)."""
    if not text:
        return text
    parse_cluster_address(text)
    return text


@dataclass(frozen=True)
class ClusterAddress:
    """A parsed ``--cluster``: Redis's (or the Sentinels') addresses, the master's name
    under Sentinel (None: a plain server) and the database."""

    hosts: tuple[tuple[str, int], ...]
    master: str | None
    db: int


def parse_cluster_address(text: str) -> ClusterAddress:
    """Parse ``--cluster`` (ValueError quoting the text)."""
    scheme, separator, rest = text.partition("://")
    if not separator or scheme not in ("redis", "redis+sentinel"):
        raise ValueError(f"{text!r} is not a redis:// or redis+sentinel:// URL")
    netloc, _, path = rest.partition("/")
    if not netloc or "@" in netloc or "?" in rest or "#" in rest:
        raise ValueError(f"{text!r}: a host is needed, and no credentials, query or fragment")
    sentinel = scheme == "redis+sentinel"
    hosts = []
    for item in netloc.split(","):
        host, colon, port = item.rpartition(":") if ":" in item else (item, "", "")
        host = host.strip("[]")
        default = 26379 if sentinel else 6379
        if not host or (colon and not (port.isdigit() and 0 < int(port) < 65536)):
            raise ValueError(f"{text!r} has a bad host or port")
        hosts.append((host, int(port) if colon else default))
    parts = [part for part in path.split("/") if part]
    master = parts.pop(0) if sentinel and parts else None
    if sentinel and master is None:
        raise ValueError(f"{text!r}: name the Sentinel master, .../MASTER[/DB]")
    if len(hosts) > 1 and not sentinel:
        raise ValueError(f"{text!r}: one Redis server (several addresses: Sentinels)")
    if len(parts) > 1 or (parts and not parts[0].isdigit()):
        raise ValueError(f"{text!r}: the database must be a number")
    return ClusterAddress(tuple(hosts), master, int(parts[0]) if parts else 0)


def redis_username(text: str) -> str:
    """A Redis ACL user name: printable ASCII without spaces ("": the default user)."""
    if text and not re.fullmatch(r"[!-~]{1,128}", text):
        raise ValueError(f"not a Redis user name: {text!r}")
    return text


def cluster_label(text: str) -> str:
    """Letters, digits, ``.``, ``_`` and ``-``: the key prefix of the cluster."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", text):
        raise ValueError(f"{text!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return text


def advertise_url(text: str) -> str:
    """A ``ws://`` or ``wss://`` base URL (no path) other relays reach this one at ("":
    derived from ``--listen``)."""
    if not text:
        return text
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked
    except ValueError:
        raise ValueError(f"{text!r} has a bad port") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"{text!r} is not a ws:// or wss:// URL with a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{text!r}: a base URL, with no path, query or credentials")
    return text.rstrip("/")


def auth_endpoint_url(text: str) -> str:
    """``--auth-url``: an ``http://`` or ``https://`` URL with a host ("": off).  The
    message never quotes it: its query may hold the endpoint's own key."""
    if not text:
        return text
    parts = urlsplit(text)
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked
    except ValueError:
        raise ValueError("the URL has a bad port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return text


AUTH_COMBINE = ("either", "both")


def auth_combine(text: str) -> str:
    """``--auth-combine``: ``either`` or ``both``."""
    if text not in AUTH_COMBINE:
        raise ValueError(f"{text!r} must be one of {', '.join(AUTH_COMBINE)}")
    return text


def non_negative_seconds(text: str) -> float:
    """A finite duration, zero included (zero meaning "off")."""
    try:
        if float(text) == 0:
            return 0.0
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    return _positive_float(text, "zero or a positive number of seconds")


def _integer(text: str) -> int:
    """``int(text)`` with a message that quotes the text."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None


def _positive_float(text: str, what: str) -> float:
    """A finite float above zero, else ValueError saying it must be ``what``."""
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"{text!r} must be {what}")
    return number


# -- declarations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """How one :class:`RelayConfig` field is set from the command line.

    ``parse`` is None for a flag, which sets the field to ``when_given``.  ``environment``
    names the variable consulted when the option is absent (secrets only).  ``secret``
    keeps the parsed value out of the options mapping: only the path is kept there.
    ``repeatable``: each occurrence adds to the value (the texts are joined with blanks
    before ``parse`` sees them).
    """

    help: str
    parse: Callable[[str], Any] | None = None
    option: str = ""
    when_given: Any = True
    environment: str = ""
    secret: bool = False
    repeatable: bool = False

    @property
    def is_flag(self) -> bool:
        """True for an option without a value (``--echo``)."""
        return self.parse is None


@dataclass(frozen=True)
class Derived:
    """A field computed from another field's value instead of having its own option."""

    source: str
    compute: Callable[[Any], Any]


def option(default: Any, help: str, parse: Callable[[str], Any]) -> Any:
    """A field set by ``--field-name VALUE``."""
    return field(default=default, metadata={_SETTING: Setting(help, parse)})


def repeated(default: tuple[Any, ...], help: str, parse: Callable[[str], Any]) -> Any:
    """A tuple field set by ``--field-name VALUE``, given any number of times."""
    return field(default=default, metadata={_SETTING: Setting(help, parse, repeatable=True)})


def flag(default: bool, help: str, *, name: str = "", when_given: bool = True) -> Any:
    """A boolean field set by a flag (``--no-takeover`` sets ``takeover`` to False)."""
    setting = Setting(help, None, option=name, when_given=when_given)
    return field(default=default, metadata={_SETTING: setting})


def secret_file(name: str, environment: str, help: str) -> Any:
    """A secret read from the file the option names, else from ``environment``; never in
    the config's repr."""
    setting = Setting(help, read_secret_file, option=name, environment=environment, secret=True)
    return field(default=None, repr=False, metadata={_SETTING: setting})


def derived(default: Any, source: str, compute: Callable[[Any], Any]) -> Any:
    """A field the options compute from the field ``source``."""
    return field(default=default, metadata={_DERIVED: Derived(source, compute)})


def fixed(default: Any) -> Any:
    """A field that is deliberately not a command-line option."""
    return field(default=default, metadata={_FIXED: True})


def _burst_for(rate: float) -> int:
    """The handshake burst allowed at ``rate`` handshakes per second: twice the rate."""
    return max(1, int(rate * 2))


def _log_burst_for(rate: float) -> int:
    """The log lines of one kind let through at once at ``rate`` a second: ten seconds'
    worth."""
    return max(1, int(rate * 10))


@dataclass(frozen=True)
class RelayConfig:
    """Every limit and timer of the relay; defaults are the production values."""

    publish_secret: bytes | None = secret_file(
        "publish-secret-file",
        "STREAMRELAY_PUBLISH_SECRET",
        "File holding the HMAC secret for publisher tokens (or env "
        "STREAMRELAY_PUBLISH_SECRET). Without one, only loopback may publish.",
    )
    view_secret: bytes | None = secret_file(
        "view-secret-file",
        "STREAMRELAY_VIEW_SECRET",
        "File holding the HMAC secret for viewer tokens (or env STREAMRELAY_VIEW_SECRET). "
        "Without one, viewing is open.",
    )
    view_origins: tuple[str, ...] = option(
        ("*",), "Comma list of Origin patterns allowed to watch.", origin_list
    )
    publish_origins: tuple[str, ...] = option(
        (),
        "Comma list of Origin patterns allowed to publish; when empty, requests with an "
        "Origin header are refused.",
        origin_list,
    )

    max_connections: int = option(10000, "Most open connections in all.", positive_int)
    max_connections_per_ip: int = option(100, "Most open connections per address.", positive_int)
    max_handshakes_per_ip: float = option(
        50.0,
        "WebSocket handshakes per second per address, burst of twice this.",
        positive_rate,
    )
    handshake_burst: int = derived(100, "max_handshakes_per_ip", _burst_for)
    max_streams: int = option(
        1000, "Most streams with a publisher at once; viewers never count.", positive_int
    )
    max_waiting_streams: int = option(
        1000,
        "Most stream names held only by viewers waiting for a first publisher; over it "
        "a viewer of another name gets 503.",
        positive_int,
    )
    max_waiting_streams_per_ip: int = option(
        20, "Most such waiting names the viewers from one address hold.", positive_int
    )
    max_viewers_per_stream: int = option(
        0, "Most viewers per stream; 0 = no limit.", non_negative_int
    )
    max_message_bytes: int = option(
        8 * MIB,
        "Largest publisher message in bytes; viewers may send 4 KiB.",
        positive_int,
    )
    max_fragments_per_message: int = option(
        4096, "Most WebSocket fragments in one incoming message.", positive_int
    )
    viewer_queue_bytes: int = option(
        4 * MIB,
        "Memory pending towards one viewer before it skips to the next keyframe (each "
        "message counts its size plus a fixed overhead).",
        positive_int,
    )
    gop_cache_bytes: int = option(
        8 * MIB,
        "GOP cache per stream in bytes (each message counts its size plus a fixed "
        "overhead); 0 turns it off.",
        non_negative_int,
    )
    gop_cache_messages: int = option(
        4096,
        "Most messages in each stream's GOP cache; over it the cache empties until the "
        "next KEY.",
        positive_int,
    )
    max_buffered_bytes: int = option(
        512 * MIB,
        "All GOP caches plus everything pending towards viewers.",
        positive_int,
    )

    ping_interval: float = option(10.0, "Seconds between WebSocket pings.", positive_seconds)
    ping_timeout: float = option(10.0, "Seconds to wait for a sign of life.", positive_seconds)
    handshake_timeout: float = option(
        5.0, "Seconds from TCP accept to a complete opening handshake.", positive_seconds
    )
    close_timeout: float = option(
        2.0,
        "Seconds a closing handshake may take before the TCP connection is aborted.",
        positive_seconds,
    )
    publisher_idle_timeout: float = option(
        20.0,
        "Seconds without a media message before a publisher is closed (not while it says it "
        "idles on demand: pings still bound it).",
        positive_seconds,
    )
    viewer_stall_timeout: float = option(
        15.0, "Seconds without write progress before a viewer is closed.", positive_seconds
    )
    keyframe_request_interval: float = option(
        1.0, "Least seconds between keyframe requests to a publisher.", positive_seconds
    )

    # The inbound budget (streamrelay.inbound): every frame a peer sends counts, control
    # frames, empty frames and fragments too; bursts follow from the rates.
    viewer_frames_per_second: float = option(
        5.0,
        "WebSocket frames (of any kind) a viewer may send per second; more is closed "
        "with 1008.",
        positive_rate,
    )
    viewer_bytes_per_second: int = option(
        4096, "Bytes a viewer may send per second; more is closed with 1008.", positive_int
    )
    publisher_frames_per_second: float = option(
        2000.0,
        "WebSocket frames (of any kind) a publisher may send per second; more is closed "
        "with 1008.",
        positive_rate,
    )
    publisher_bytes_per_second: int = option(
        16 * MIB,
        "Bytes a publisher may send per second; more is closed with 1008.",
        positive_int,
    )

    takeover: bool = flag(
        True,
        "Refuse (409) a second publisher instead of replacing the first.",
        name="no-takeover",
        when_given=False,
    )
    echo: bool = flag(False, "Enable the /echo WebSocket endpoint (for conformance runs).")
    api_internals: bool = flag(
        False,
        "Serve /api/internals (loopback only): live object counts for leak accounting. "
        "Each request runs gc.collect(), so leave it off in production.",
    )

    # -- relay to relay (docs/cluster.md): /relay/{stream} serves edges; --upstream pulls.
    relay_secret: bytes | None = secret_file(
        "relay-secret-file",
        "STREAMRELAY_RELAY_SECRET",
        "File holding the HMAC secret shared by relays (or env STREAMRELAY_RELAY_SECRET): "
        "it opens /relay/NAME to edges holding relay tokens, and signs this relay's own "
        "tokens towards --upstream. Without one, /relay/NAME is refused.",
    )
    upstream: tuple[str, ...] = repeated(
        (),
        "Upstream relay to pull streams from, repeatable (tried in turn): a URL template "
        "such as ws://origin:8080/relay/{stream}, or a base URL such as ws://origin:8080. "
        "Streams with no local publisher are pulled on their first viewer. Needs "
        "--relay-secret-file.",
        upstream_urls,
    )
    upstream_grace: float = option(
        5.0,
        "Seconds a pull from the upstream outlives its last local viewer; a viewer back "
        "within it reuses the pull.",
        positive_seconds,
    )
    max_pulls: int = option(
        64,
        "Most streams pulled from the upstream at once; a viewer that would need one more "
        "gets 503.",
        positive_int,
    )
    relay_queue_bytes: int = option(
        16 * MIB,
        "Memory pending towards one edge relay pulling from /relay/NAME before it skips "
        "to the next keyframe, as a viewer does.",
        positive_int,
    )
    # -- the cluster (docs/cluster.md): a Redis directory of origins.
    cluster: str = option(
        "",
        "Join a cluster whose directory is this Redis server, redis://HOST:PORT/DB (or "
        "Sentinels: redis+sentinel://HOST:PORT,HOST:PORT/MASTER/DB): "
        "streams published on other nodes are pulled from their origin on a first viewer. "
        "Needs --relay-secret-file. Empty: not in a cluster.",
        cluster_url,
    )
    cluster_name: str = option(
        "streamrelay",
        "Name of the cluster: the Redis key prefix, so clusters can share one server.",
        cluster_label,
    )
    cluster_password: bytes | None = secret_file(
        "cluster-password-file",
        "STREAMRELAY_CLUSTER_PASSWORD",
        "File holding the password of the cluster's Redis server (its requirepass, or the "
        "password of --cluster-username), or env STREAMRELAY_CLUSTER_PASSWORD. With "
        "Sentinels, the master's password (the Sentinels themselves are asked without one).",
    )
    cluster_username: str = option(
        "",
        "Redis ACL user the cluster directory logs in as (with --cluster-password-file); "
        "empty: the default user.",
        redis_username,
    )
    advertise: str = option(
        "",
        "Base URL other nodes of the cluster reach this relay at, e.g. "
        "ws://10.0.0.5:8080 (they pull /relay/NAME from it); by default the first "
        "--listen port on 127.0.0.1 (a cluster of one box).",
        advertise_url,
    )
    # Operations: addresses behind a reverse proxy, metrics and logs (docs/operations.md).
    trust_proxy: int = option(
        0,
        "Take each client's address from the last N X-Forwarded-For hops, N being the "
        "number of reverse proxies in front (which must be the only way in); 0 = off: "
        "the TCP peer is the client.",
        non_negative_int,
    )
    stream_metrics: bool = flag(
        True,
        "Leave the per-stream series out of /metrics (one set per live stream, at most "
        "--max-streams of them).",
        name="no-stream-metrics",
        when_given=False,
    )
    json_logs: bool = flag(
        False,
        "Log one JSON object per line on standard output (for log shippers) instead of "
        "text lines.",
    )
    log_rate: float = option(
        10.0,
        "Log lines per second of each kind (each message the relay logs is a kind), with "
        "bursts of ten seconds' worth; lines over it are counted, and a summary says how "
        "many were suppressed.",
        positive_rate,
    )
    log_burst: int = derived(100, "log_rate", _log_burst_for)

    # -- authorisation by the user's application (docs/protocol.md): streamrelay.auth_url.
    auth_url: str = option(
        "",
        "Ask this HTTP endpoint about every publish, view and relay handshake (POST, "
        "JSON): 2xx admits, 403 refuses with 403, others with 401; slow or down: 503. "
        "Empty: off.",
        auth_endpoint_url,
    )
    auth_combine: str = option(
        "either",
        "How --auth-url composes with HMAC tokens: either (a valid token admits without "
        "asking, else the endpoint decides) or both (a token, where a secret is set, and "
        "the endpoint must admit).",
        auth_combine,
    )
    auth_timeout: float = option(
        2.0,
        "Seconds the --auth-url endpoint may take (within the handshake timeout); over "
        "it the handshake gets 503.",
        positive_seconds,
    )
    auth_max_concurrent: int = option(
        100,
        "Most --auth-url calls in progress at once; a handshake over it gets 503.",
        positive_int,
    )
    auth_cache_seconds: float = option(
        5.0,
        "Seconds an --auth-url answer (admit, 401, 403) is reused for the same role, "
        "stream, client and credentials; 0 = no cache.",
        non_negative_seconds,
    )
    auth_cache_entries: int = fixed(4096)

    # -- one box, many cores (docs/cluster.md): streamrelay.workers.
    workers: int = option(
        0,
        "Worker processes sharing the --listen sockets (POSIX; 0 = serve in this "
        "process). This process binds the sockets, supervises the workers, restarts "
        "them, drains them all on SIGTERM, and tells each where a stream published on "
        "a sibling can be pulled from.",
        non_negative_int,
    )
    worker_relay_ports: int = option(
        0,
        "With --workers and --cluster: worker N (from 1) is its own cluster node and "
        "serves other nodes' /relay pulls on port BASE+N-1, bound on the --advertise "
        "host when it is an IP address (else on 0.0.0.0) and advertised as "
        "ws://ADVERTISE-HOST:PORT. Required with both, unused otherwise; 0 = none.",
        non_negative_int,
    )

    # Bounds of the HTTP request head, answered with 431 (twisted.web alone answers 400).
    max_header_bytes: int = fixed(16 * 1024)
    max_header_line_bytes: int = fixed(8 * 1024)
    max_header_lines: int = fixed(100)


# -- reading the declarations -------------------------------------------------------------------


@dataclass(frozen=True)
class Declared:
    """One command-line setting: the field it sets, its option name and its default."""

    field: str
    option: str
    setting: Setting
    default: Any

    def shown(self) -> str | None:
        """The default as it would be typed on the command line (None: no default)."""
        if self.default is None or self.setting.is_flag:
            return None
        if isinstance(self.default, tuple):
            return ",".join(self.default)
        return str(self.default)


def settings() -> Iterator[Declared]:
    """Every command-line setting of :class:`RelayConfig`, in declaration order."""
    for item in fields(RelayConfig):
        setting = item.metadata.get(_SETTING)
        if isinstance(setting, Setting):
            name = setting.option or item.name.replace("_", "-")
            yield Declared(item.name, name, setting, item.default)


def derivations() -> Iterator[tuple[str, Derived]]:
    """Every field computed from another one, as ``(field, Derived)``."""
    for item in fields(RelayConfig):
        rule = item.metadata.get(_DERIVED)
        if isinstance(rule, Derived):
            yield item.name, rule


def is_fixed(name: str) -> bool:
    """True when field ``name`` is deliberately not settable from the command line."""
    return any(item.name == name and item.metadata.get(_FIXED) for item in fields(RelayConfig))
