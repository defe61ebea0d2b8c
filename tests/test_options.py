"""``twistd streamrelay`` options: defaults, bad values, secrets, the select cap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.python import usage

from streamrelay import tap
from streamrelay.config import RelayConfig
from streamrelay.tap import Options

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
    )
    # The dataclass's own defaults agree with the command line's.
    assert config == RelayConfig()


def test_every_option_is_converted_into_the_config() -> None:
    """Each option reaches the relay's configuration."""
    config = parse(
        "--max-connections", "50",
        "--max-connections-per-ip", "5",
        "--max-handshakes-per-ip", "2.5",
        "--max-streams", "7",
        "--max-viewers-per-stream", "3",
        "--max-message-bytes", "1000",
        "--max-fragments-per-message", "16",
        "--viewer-queue-bytes", "2000",
        "--gop-cache-bytes", "0",
        "--max-buffered-bytes", "9000",
        "--ping-interval", "1.5",
        "--ping-timeout", "2",
        "--handshake-timeout", "3",
        "--close-timeout", "0.5",
        "--publisher-idle-timeout", "4",
        "--viewer-stall-timeout", "6",
        "--keyframe-request-interval", "0.25",
        "--view-origins", "https://*.example.com, http://localhost:8000",
        "--publish-origins", "null,https://studio.example.com",
        "--no-takeover",
        "--echo",
    ).config()
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


_POSITIVE_INTS = [
    "max-connections", "max-connections-per-ip", "max-streams", "max-message-bytes",
    "viewer-queue-bytes", "max-buffered-bytes", "max-fragments-per-message",
]
_NON_NEGATIVE_INTS = ["max-viewers-per-stream", "gop-cache-bytes"]
_POSITIVE_SECONDS = [
    "ping-interval", "ping-timeout", "handshake-timeout", "close-timeout",
    "publisher-idle-timeout", "viewer-stall-timeout", "keyframe-request-interval",
    "max-handshakes-per-ip",
]


@pytest.mark.parametrize(
    ("option", "value"),
    [(name, bad) for name in _POSITIVE_INTS for bad in ("0", "-1", "1.5", "x", "", "1e3")]
    + [(name, bad) for name in _NON_NEGATIVE_INTS for bad in ("-1", "2.5", "many")]
    + [(name, bad) for name in _POSITIVE_SECONDS for bad in ("0", "-2", "nan", "inf", "soon")],
)
def test_bad_values_are_usage_errors_naming_the_option(option: str, value: str) -> None:
    """A bad value is a usage error whose message names the option."""
    assert f"--{option}" in usage_error(f"--{option}", value)


@pytest.mark.parametrize("option", _NON_NEGATIVE_INTS)
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


def test_every_option_has_help_text() -> None:
    """``twistd streamrelay --help`` documents every option."""
    text = str(Options())
    for name in (
        ["listen", "publish-secret-file", "view-secret-file", "view-origins",
         "publish-origins", "no-takeover", "echo"]
        + _POSITIVE_INTS + _NON_NEGATIVE_INTS + _POSITIVE_SECONDS
    ):
        line = next(line for line in text.splitlines() if f"--{name}" in line)
        assert len(line.split(f"--{name}", 1)[1].strip()) > 10, line


# -- --listen --------------------------------------------------------------------------


def test_listen_is_repeatable_in_order(tmp_path: Path) -> None:
    """Several --listen options give several listeners, in the order given."""
    socket_path = tmp_path / "relay.sock"
    options = parse(
        "--listen", "tcp:0:interface=127.0.0.1",
        "--listen", f"unix:{socket_path}",
        "--listen", "tcp6:0:interface=\\:\\:1",
    )
    assert options["listen"] == [
        "tcp:0:interface=127.0.0.1", f"unix:{socket_path}", "tcp6:0:interface=\\:\\:1",
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


# -- secrets -----------------------------------------------------------------------------


def test_secret_files_are_read(tmp_path: Path) -> None:
    """--publish-secret-file and --view-secret-file hold the HMAC keys."""
    publish = tmp_path / "publish"
    view = tmp_path / "view"
    publish.write_bytes(b"pub-secret\n")
    view.write_bytes(b"view-secret")
    config = parse(
        "--publish-secret-file", str(publish), "--view-secret-file", str(view)
    ).config()
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


def _fit(monkeypatch: pytest.MonkeyPatch, reactor: Any, wanted: int, soft: int, hard: int):
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
