"""``twistd streamrelay`` options: derived from RelayConfig's declarations; defaults, bad
values, secrets, --listen, --demo without PyAV, the select cap."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Any

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from zope.interface import implementer

from streamrelay import config as config_module
from streamrelay import tap
from streamrelay.config import Declared, RelayConfig, derivations, is_fixed, settings
from streamrelay.tap import AnnouncedEndpoint, Options

MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_secrets_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMRELAY_PUBLISH_SECRET", raising=False)
    monkeypatch.delenv("STREAMRELAY_VIEW_SECRET", raising=False)


def parse(*arguments: str) -> Options:
    options = Options()
    options.parseOptions(list(arguments))
    return options


def usage_error(*arguments: str) -> str:
    """The message of the usage error these arguments cause."""
    with pytest.raises(usage.UsageError) as raised:
        parse(*arguments)
    return str(raised.value)


def test_defaults_are_the_documented_production_values() -> None:
    """With no options: tcp:8080 and every documented default."""
    options = parse()
    assert options["listen"] == ["tcp:8080"]
    config = options.config()
    assert config == RelayConfig(
        publish_secret=None,
        view_secret=None,
        view_origins=("*",),
        publish_origins=(),
        max_connections=10000,
        max_connections_per_ip=100,
        max_handshakes_per_ip=50.0,
        handshake_burst=100,
        max_streams=1000,
        max_viewers_per_stream=0,
        max_message_bytes=8 * MIB,
        viewer_queue_bytes=4 * MIB,
        gop_cache_bytes=8 * MIB,
        max_buffered_bytes=512 * MIB,
        ping_interval=10.0,
        ping_timeout=10.0,
        handshake_timeout=5.0,
        close_timeout=2.0,
        publisher_idle_timeout=20.0,
        viewer_stall_timeout=15.0,
        keyframe_request_interval=1.0,
        takeover=True,
        echo=False,
        api_internals=False,
    )
    # The dataclass's own defaults agree with the command line's.
    assert config == RelayConfig()


def test_every_option_is_converted_into_the_config() -> None:
    """Each option reaches the relay's configuration."""
    given = {
        "max-connections": "50",
        "max-connections-per-ip": "5",
        "max-handshakes-per-ip": "2.5",
        "max-streams": "7",
        "max-viewers-per-stream": "3",
        "max-message-bytes": "1000",
        "max-fragments-per-message": "16",
        "viewer-queue-bytes": "2000",
        "gop-cache-bytes": "0",
        "max-buffered-bytes": "9000",
        "ping-interval": "1.5",
        "ping-timeout": "2",
        "handshake-timeout": "3",
        "close-timeout": "0.5",
        "publisher-idle-timeout": "4",
        "viewer-stall-timeout": "6",
        "keyframe-request-interval": "0.25",
        "view-origins": "https://*.example.com, http://localhost:8000",
        "publish-origins": "null,https://studio.example.com",
    }
    arguments = [part for name, text in given.items() for part in (f"--{name}", text)]
    config = parse(*arguments, "--no-takeover", "--echo").config()
    assert (config.max_connections, config.max_connections_per_ip) == (50, 5)
    assert (config.max_handshakes_per_ip, config.handshake_burst) == (2.5, 5)
    assert (config.max_streams, config.max_viewers_per_stream) == (7, 3)
    assert (config.max_message_bytes, config.max_fragments_per_message) == (1000, 16)
    assert (config.viewer_queue_bytes, config.gop_cache_bytes) == (2000, 0)
    assert config.max_buffered_bytes == 9000
    assert (config.ping_interval, config.ping_timeout) == (1.5, 2.0)
    assert (config.handshake_timeout, config.close_timeout) == (3.0, 0.5)
    assert (config.publisher_idle_timeout, config.viewer_stall_timeout) == (4.0, 6.0)
    assert config.keyframe_request_interval == 0.25
    assert config.view_origins == ("https://*.example.com", "http://localhost:8000")
    assert config.publish_origins == ("null", "https://studio.example.com")
    assert config.takeover is False and config.echo is True


# -- the options derived from RelayConfig ------------------------------------------------------

# Text each kind of value refuses and a text it accepts with its value.  A setting whose
# parser is missing here fails test_every_parser_is_exercised.
_BAD_TEXT: dict[Callable[[str], Any], tuple[str, ...]] = {
    config_module.positive_int: ("0", "-1", "1.5", "x", "", "1e3"),
    config_module.non_negative_int: ("-1", "2.5", "many"),
    config_module.positive_seconds: ("0", "-2", "nan", "inf", "soon"),
    config_module.positive_rate: ("0", "-2", "nan", "inf", "often"),
    config_module.origin_list: ("https://a.example, https://b example",),
    config_module.cluster_url: (
        "http://redis:6379",
        "redis://:pw@redis:6379/0",
        "redis://redis:6379/x",
        "redis://redis:99999/0",
    ),
    config_module.cluster_label: ("", "a b", "x" * 65),
    config_module.redis_username: ("a b", "x" * 129, "caf\u00e9"),
    config_module.advertise_url: ("http://node:8080", "ws://node:8080/relay", "ws://u@node"),
    config_module.upstream_urls: (
        "http://origin:8080",
        "ws://origin:8080/relay/cam",
        "ws://origin:8080/?token=x",
        "ws://user:pw@origin:8080",
        "ws://origin:99999",
        "ws:///relay/{stream}",
    ),
    config_module.auth_endpoint_url: ("ws://auth:8080/x", "http://", "http://a:99999/"),
    config_module.auth_combine: ("any", ""),
    config_module.non_negative_seconds: ("-1", "nan", "inf", "never"),
}
_GOOD_TEXT: dict[Callable[[str], Any], tuple[str, Any]] = {
    config_module.positive_int: ("7", 7),
    config_module.non_negative_int: ("3", 3),
    config_module.positive_seconds: ("2.5", 2.5),
    config_module.positive_rate: ("0.75", 0.75),
    config_module.origin_list: (" https://a.example ,null", ("https://a.example", "null")),
    config_module.cluster_url: ("redis://10.0.0.2:6380/3", "redis://10.0.0.2:6380/3"),
    config_module.cluster_label: ("prod-eu", "prod-eu"),
    config_module.redis_username: ("relay-node", "relay-node"),
    config_module.advertise_url: ("ws://10.0.0.5:8080/", "ws://10.0.0.5:8080"),
    config_module.upstream_urls: (
        "ws://origin:8080, wss://b.example/r/{stream}",
        ("ws://origin:8080/relay/{stream}", "wss://b.example/r/{stream}"),
    ),
    config_module.auth_endpoint_url: (
        "https://app.example/auth?key=k", "https://app.example/auth?key=k"
    ),
    config_module.auth_combine: ("both", "both"),
    config_module.non_negative_seconds: ("0", 0.0),
}
# Settings that only make sense with another one: (its option, its field).
_NEEDS: dict[str, tuple[str, str]] = {
    "upstream": ("relay-secret-file", "relay_secret"),
    "cluster": ("relay-secret-file", "relay_secret"),
}
_WIRING_OPTIONS = {"listen", "metrics-listen", "demo"}  # process wiring, not RelayConfig settings

_DECLARED = list(settings())
_VALUED = [d for d in _DECLARED if not d.setting.is_flag and not d.setting.secret]
_FLAGS = [d for d in _DECLARED if d.setting.is_flag]


def _help_blocks() -> dict[str, str]:
    """Each option's entry in ``--help``, its wrapped lines joined by single spaces."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in str(Options()).splitlines():
        match = re.match(r"\s+--([a-z-]+)=?\s", line + " ")
        if match:
            current = blocks.setdefault(match.group(1), [])
            current.append(line.split(match.group(0).strip(), 1)[1])
        elif line.startswith(" " * 10) and current is not None:
            current.append(line)
        else:
            current = []
    return {name: " ".join(" ".join(lines).split()) for name, lines in blocks.items()}


def test_every_field_is_exactly_one_option_or_says_why_not() -> None:
    """Each RelayConfig field is set by exactly one option, or is declared derived from
    another field or fixed; no two fields share an option."""
    options = [d.option for d in _DECLARED]
    assert len(options) == len(set(options))
    derived_fields = {name: rule.source for name, rule in derivations()}
    for item in fields(RelayConfig):
        kinds = [
            item.name in {d.field for d in _DECLARED},
            item.name in derived_fields,
            is_fixed(item.name),
        ]
        assert kinds.count(True) == 1, item.name
    for name, source in derived_fields.items():
        assert source in {d.field for d in _DECLARED}, name


def test_options_are_exactly_the_declared_settings_and_the_wiring() -> None:
    """twistd's option table is derived: parameters for valued settings, flags for
    boolean ones, plus --listen, --metrics-listen and --demo."""
    parameters = {row[0] for row in Options.optParameters}
    flags = {row[0] for row in Options.optFlags}
    assert parameters == {d.option for d in _DECLARED if not d.setting.is_flag}
    assert flags == {d.option for d in _FLAGS} | {"demo"}
    help_options = set(_help_blocks()) - {"help", "version"}
    assert help_options == parameters | flags | _WIRING_OPTIONS


def test_help_shows_each_default_once() -> None:
    """``--help`` documents every option, and a default appears once, as Twisted's
    ``[default: ...]``, never again in the help text (no "(2). [default: 2.0]")."""
    blocks = _help_blocks()
    for declared in _DECLARED:
        block = blocks[declared.option]
        assert len(declared.setting.help) > 10, declared.option
        shown = declared.shown()
        if shown is None:
            assert "[default:" not in block, block
            continue
        assert block.count("[default:") == 1, block
        assert f"[default: {shown}]" in block, block
        assert re.search(r"\(\d[\d.]*( [KMG]iB)?\)", declared.setting.help) is None, block
    for name in _WIRING_OPTIONS:
        assert len(blocks[name]) > 10, name


def test_shown_defaults_parse_back_to_the_field_defaults() -> None:
    """The default twistd shows is text that the option parses into the field's own
    default, so the command line and ``RelayConfig()`` agree."""
    for declared in _VALUED:
        assert declared.setting.parse is not None
        shown = declared.shown()
        assert shown is not None, declared.option
        assert declared.setting.parse(shown) == declared.default, declared.option


def test_every_parser_is_exercised() -> None:
    """Every kind of value a setting takes has good and bad samples in this file."""
    for declared in _VALUED:
        assert declared.setting.parse in _BAD_TEXT, declared.option
        assert declared.setting.parse in _GOOD_TEXT, declared.option


@pytest.mark.parametrize("declared", _VALUED, ids=lambda d: d.option)
def test_each_option_converts_into_its_field(declared: Declared, tmp_path: Path) -> None:
    """``--option TEXT`` sets exactly its field to the parsed value (with the option it
    needs, if any); the option mapping holds the value too."""
    text, value = _GOOD_TEXT[declared.setting.parse]  # type: ignore[index]
    arguments = [f"--{declared.option}", text]
    needed = _NEEDS.get(declared.option)
    if needed is not None:
        secret = tmp_path / "secret"
        secret.write_bytes(b"relay-secret")
        arguments += [f"--{needed[0]}", str(secret)]
    options = parse(*arguments)
    config = options.config()
    assert getattr(config, declared.field) == value
    assert options[declared.option] == value
    changed = {
        item.name
        for item in fields(RelayConfig)
        if getattr(config, item.name) != getattr(RelayConfig(), item.name)
    }
    derived_from_this = {name for name, rule in derivations() if rule.source == declared.field}
    given_with_it = {needed[1]} if needed is not None else set()
    assert changed - derived_from_this - given_with_it == {declared.field}


@pytest.mark.parametrize("declared", _FLAGS, ids=lambda d: d.option)
def test_each_flag_sets_its_field(declared: Declared) -> None:
    """A flag sets its field away from the default (--no-takeover turns takeover off)."""
    assert getattr(parse().config(), declared.field) == declared.default
    config = parse(f"--{declared.option}").config()
    assert getattr(config, declared.field) == declared.setting.when_given != declared.default


def test_api_internals_is_off_unless_asked_for() -> None:
    """/api/internals (gc.collect() per request) is served only with --api-internals."""
    assert parse().config().api_internals is False
    assert parse("--api-internals").config().api_internals is True


@pytest.mark.parametrize(
    ("option", "value"),
    [
        (declared.option, bad)
        for declared in _VALUED
        for bad in _BAD_TEXT.get(declared.setting.parse, ())  # type: ignore[arg-type]
    ],
)
def test_bad_values_are_usage_errors_naming_the_option(option: str, value: str) -> None:
    """A bad value is a usage error whose message starts with the option's name."""
    assert usage_error(f"--{option}", value).startswith(f"--{option}: ")


@pytest.mark.parametrize("option", ["max-viewers-per-stream", "gop-cache-bytes"])
def test_zero_is_allowed_where_it_means_off(option: str) -> None:
    """0 viewers = no limit; 0 GOP cache bytes = cache off."""
    parse(f"--{option}", "0")


@pytest.mark.parametrize("option", ["view-origins", "publish-origins"])
def test_origin_patterns_with_spaces_are_refused(option: str) -> None:
    """An origin pattern cannot contain whitespace."""
    assert f"--{option}" in usage_error(f"--{option}", "https://a.example, https://b example")


def test_unknown_option_is_a_usage_error() -> None:
    """Typos are not silently ignored."""
    usage_error("--max-conections", "5")


# -- --demo needs the publisher extra ------------------------------------------------------------


def test_demo_without_pyav_is_a_usage_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without PyAV, ``--demo`` refuses with the pip command that installs the publisher."""
    looked_up: list[str] = []

    def find_spec(name: str) -> None:
        looked_up.append(name)
        return None

    monkeypatch.setattr(tap, "find_spec", find_spec)
    message = usage_error("--demo")
    assert "--demo" in message and "pip install 'streamrelay[publisher]'" in message
    assert looked_up == ["av"]
    parse()  # the relay itself does not need PyAV


def test_demo_with_pyav_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    """With PyAV importable, ``--demo`` parses."""
    monkeypatch.setattr(tap, "find_spec", lambda name: ModuleSpec(name, None))
    assert parse("--demo")["demo"]


def test_relay_modules_do_not_import_pyav() -> None:
    """The relay's wiring imports and parses its options with PyAV unimportable, and
    ``--demo`` then gives the clear error (a fresh interpreter, so nothing is cached)."""
    script = (
        "import sys\n"
        "sys.modules['av'] = None\n"
        "from twisted.python import usage\n"
        "import streamrelay.config, streamrelay.demo, streamrelay.tap as tap\n"
        "tap.Options().parseOptions(['--listen', 'tcp:0'])\n"
        "try:\n"
        "    tap.Options().parseOptions(['--demo'])\n"
        "except usage.UsageError as error:\n"
        "    print(error)\n"
    )
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'streamrelay[publisher]'" in result.stdout


# -- --listen --------------------------------------------------------------------------


def test_listen_is_repeatable_in_order(tmp_path: Path) -> None:
    """Several --listen options give several listeners, in the order given."""
    socket_path = tmp_path / "relay.sock"
    options = parse(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        f"unix:{socket_path}",
        "--listen",
        "tcp6:0:interface=\\:\\:1",
    )
    assert options["listen"] == [
        "tcp:0:interface=127.0.0.1",
        f"unix:{socket_path}",
        "tcp6:0:interface=\\:\\:1",
    ]


@pytest.mark.parametrize("description", ["bogus:80", "tcp:http", "tcp:80:backlog=lots", "tcp"])
def test_bad_listen_endpoint_is_a_usage_error(description: str) -> None:
    """An endpoint Twisted cannot parse is a usage error naming --listen."""
    assert "--listen" in usage_error("--listen", "tcp:0", "--listen", description)


def test_ssl_listen_with_missing_key_file_is_a_usage_error(tmp_path: Path) -> None:
    """``ssl:8443:privateKey=missing.pem`` is a usage error naming --listen, not a
    traceback."""
    missing = tmp_path / "missing.pem"
    message = usage_error("--listen", f"ssl:8443:privateKey={missing}:certKey={missing}")
    assert "--listen" in message


@pytest.mark.parametrize("description", ["tcp:99999", "tcp:-5"])
def test_listen_port_out_of_range_is_a_usage_error(description: str) -> None:
    """A TCP port outside 0-65535 is a usage error naming --listen."""
    assert "--listen" in usage_error("--listen", description)


# -- listeners: stock StreamServerEndpointService, bound address announced ----------------------

_LAUNCHER = re.compile(r"streamrelay listening on \S+ (https?)://([^/]+)/")


class _Port:
    """A listening port bound at ``address``."""

    def __init__(self, address: Any) -> None:
        self.address = address

    def getHost(self) -> Any:
        return self.address


@implementer(IStreamServerEndpoint)
class _BoundEndpoint:
    """An endpoint whose listen() has already bound ``address``."""

    def __init__(self, address: Any) -> None:
        self.address = address
        self.factories: list[object] = []

    def listen(self, factory: object) -> Deferred[Any]:
        self.factories.append(factory)
        return succeed(_Port(self.address))


def _announce(description: str, address: Any) -> tuple[AnnouncedEndpoint, str]:
    endpoint = AnnouncedEndpoint(_BoundEndpoint(address), description)
    with capturedLogs() as events:
        ports: list[object] = []
        endpoint.listen(Factory()).addCallback(ports.append)
    assert ports and endpoint.port is ports[0]
    messages = [formatEvent(event) for event in events]
    assert len(messages) == 1, messages
    return endpoint, messages[0]


def test_bound_address_is_logged_as_the_launcher_reads_it() -> None:
    """``tcp:0`` is announced with the port it really got, in the line the test launcher
    parses: ``streamrelay listening on tcp:43210: http://127.0.0.1:43210/``."""
    endpoint, message = _announce(
        "tcp:0:interface=127.0.0.1", IPv4Address("TCP", "127.0.0.1", 43210)
    )
    assert message == "streamrelay listening on tcp:43210: http://127.0.0.1:43210/"
    match = _LAUNCHER.search(message)
    assert match and match.groups() == ("http", "127.0.0.1:43210")
    assert endpoint.publish_url("demo") == "ws://127.0.0.1:43210/publish/demo"


def test_wildcard_tls_and_ipv6_addresses_are_announced() -> None:
    """tcp:8080 on all interfaces, ssl: as https/wss, IPv6 in brackets; the demo publisher
    reaches a wildcard listener through loopback."""
    endpoint, message = _announce("tcp:8080", IPv4Address("TCP", "0.0.0.0", 8080))
    assert message == "streamrelay listening on tcp:8080: http://0.0.0.0:8080/"
    assert endpoint.publish_url("demo") == "ws://127.0.0.1:8080/publish/demo"
    endpoint, message = _announce("ssl:8443:privateKey=k.pem", IPv4Address("TCP", "0.0.0.0", 8443))
    assert message == "streamrelay listening on ssl:8443: https://0.0.0.0:8443/"
    assert endpoint.publish_url("demo") == "wss://127.0.0.1:8443/publish/demo"
    endpoint, message = _announce("tcp6:0:interface=\\:\\:1", IPv6Address("TCP", "::1", 4444))
    assert message == "streamrelay listening on tcp6:4444: http://[::1]:4444/"
    assert endpoint.publish_url("demo") == "ws://[::1]:4444/publish/demo"


def test_unix_listener_is_announced_without_a_url(tmp_path: Path) -> None:
    """A unix: listener is logged by its path and offers no URL to the demo publisher."""
    path = str(tmp_path / "relay.sock")
    endpoint, message = _announce(f"unix:{path}", UNIXAddress(path))
    assert message.startswith("streamrelay listening on ") and path in message
    assert _LAUNCHER.search(message) is None
    assert endpoint.publish_url("demo") is None


def test_listener_binds_the_site_and_stops_listening() -> None:
    """The stock endpoint service listens with the relay's factory when started and stops
    listening when stopped."""
    reactor = MemoryReactor()
    factory = Factory()
    service = tap.listener(reactor, "tcp:0:interface=127.0.0.1", factory)
    assert isinstance(service, StreamServerEndpointService)
    service.privilegedStartService()
    service.startService()
    assert [(port, bound) for port, bound, _, _ in reactor.tcpServers] == [(0, factory)]
    assert service.endpoint.port is not None
    stopped: list[object] = []
    service.stopService().addCallback(stopped.append)
    assert stopped == [None] and not service.running


def test_failing_to_bind_fails_startup() -> None:
    """A port that cannot be bound raises from privilegedStartService, so twistd reports
    it and exits instead of running without the listener."""
    refused = CannotListenError("127.0.0.1", 8080, OSError("Address already in use"))
    reactor = RaisingMemoryReactor(listenException=refused)
    service = tap.listener(reactor, "tcp:8080:interface=127.0.0.1", Factory())
    with pytest.raises(CannotListenError):
        service.privilegedStartService()
    assert service.endpoint.port is None


# -- secrets -----------------------------------------------------------------------------


def test_secret_files_are_read(tmp_path: Path) -> None:
    """--publish-secret-file and --view-secret-file hold the HMAC keys."""
    publish = tmp_path / "publish"
    view = tmp_path / "view"
    publish.write_bytes(b"pub-secret\n")
    view.write_bytes(b"view-secret")
    config = parse("--publish-secret-file", str(publish), "--view-secret-file", str(view)).config()
    assert config.publish_secret == b"pub-secret"
    assert config.view_secret == b"view-secret"


def test_secrets_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the file options the environment variables are used."""
    monkeypatch.setenv("STREAMRELAY_PUBLISH_SECRET", "from-env")
    monkeypatch.setenv("STREAMRELAY_VIEW_SECRET", "view-env")
    config = parse().config()
    assert config.publish_secret == b"from-env"
    assert config.view_secret == b"view-env"


def test_secret_file_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit file is preferred to the environment."""
    monkeypatch.setenv("STREAMRELAY_PUBLISH_SECRET", "from-env")
    path = tmp_path / "secret"
    path.write_bytes(b"from-file")
    assert parse("--publish-secret-file", str(path)).config().publish_secret == b"from-file"


def test_no_secret_anywhere_means_none() -> None:
    """No file and no variable: loopback-only publishing, open viewing."""
    config = parse().config()
    assert config.publish_secret is None and config.view_secret is None


@pytest.mark.parametrize("option", ["publish-secret-file", "view-secret-file"])
def test_missing_or_empty_secret_file_is_a_usage_error(option: str, tmp_path: Path) -> None:
    """A secret file that cannot be read, or is empty, is a usage error naming it."""
    assert f"--{option}" in usage_error(f"--{option}", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n\n")
    assert f"--{option}" in usage_error(f"--{option}", str(empty))


def test_secret_never_appears_in_the_config_repr(tmp_path: Path) -> None:
    """A logged or printed config does not reveal the secrets."""
    path = tmp_path / "secret"
    path.write_bytes(b"super-secret-value")
    config = parse("--publish-secret-file", str(path), "--view-secret-file", str(path)).config()
    assert "super-secret-value" not in repr(config)


def test_secret_stays_out_of_the_options_mapping(tmp_path: Path) -> None:
    """The options keep the secret file's path, not the secret read from it."""
    path = tmp_path / "secret"
    path.write_bytes(b"super-secret-value")
    options = parse("--publish-secret-file", str(path))
    assert options["publish-secret-file"] == str(path)
    assert "super-secret-value" not in repr(dict(options))


# -- descriptor limits and the select reactor ----------------------------------------------


class _FakeRlimit:
    """Stands in for the ``resource`` module so tests never change the real limits."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int) -> None:
        self.limits = (soft, hard)
        self.set_calls: list[tuple[int, int]] = []

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        self.set_calls.append(limits)
        self.limits = limits


class SelectReactor:
    """Named like Twisted's select reactor, which is what the cap looks at."""


class EPollReactor:
    pass


def _fit(
    monkeypatch: pytest.MonkeyPatch, reactor: Any, wanted: int, soft: int, hard: int
) -> tuple[int, _FakeRlimit]:
    fake = _FakeRlimit(soft, hard)
    monkeypatch.setattr(tap, "rlimit", fake)
    return tap._fit_descriptor_limit(reactor, wanted), fake


def test_select_reactor_caps_max_connections_below_fd_setsize(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the select reactor --max-connections stays below its 1024 descriptors."""
    allowed, _ = _fit(monkeypatch, SelectReactor(), 10000, soft=1 << 20, hard=1 << 20)
    assert allowed < tap.SELECT_FD_LIMIT
    assert allowed > 0
    allowed_small, _ = _fit(monkeypatch, SelectReactor(), 100, soft=1 << 20, hard=1 << 20)
    assert allowed_small == 100


def test_other_reactors_are_not_capped_when_descriptors_suffice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """epoll and friends keep --max-connections when the process may open enough."""
    allowed, fake = _fit(monkeypatch, EPollReactor(), 10000, soft=1 << 20, hard=1 << 20)
    assert allowed == 10000
    assert fake.set_calls == []


def test_soft_descriptor_limit_is_raised_towards_the_need(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A low soft limit is raised (up to the hard limit) so the connections fit."""
    allowed, fake = _fit(monkeypatch, EPollReactor(), 10000, soft=1024, hard=1 << 20)
    assert allowed == 10000
    assert fake.limits[0] >= 10000
    assert fake.limits[1] == 1 << 20


def test_connections_capped_by_the_hard_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When even the hard limit is too low, --max-connections is lowered under it."""
    allowed, fake = _fit(monkeypatch, EPollReactor(), 10000, soft=512, hard=4096)
    assert fake.limits == (4096, 4096)
    assert 0 < allowed < 4096


@pytest.mark.parametrize(
    ("given", "bound"),
    [
        ("tcp:8080", "tcp:8080:backlog=4096"),
        ("tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=4096"),
        ("tcp:8080:backlog=16", "tcp:8080:backlog=16"),
        ("unix:/run/relay.sock", "unix:/run/relay.sock:backlog=4096"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_listeners_get_a_deep_backlog_unless_they_name_one(given: str, bound: str) -> None:
    """A reconnect storm must not wait on Twisted's default backlog of 50: endpoints
    that take a backlog get 4096 unless the description sets one."""
    from streamrelay.tap import with_backlog

    assert with_backlog(given) == bound
