"""``--cluster`` on the command line: what it needs, what it refuses, what it derives."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from streamrelay.cluster import WorkerNode, worker_node
from streamrelay.tap import Options

REDIS = "redis://127.0.0.1:6379/0"


def parse(*arguments: str) -> Options:
    """Parsed options."""
    options = Options()
    options.parseOptions(list(arguments))
    return options


@pytest.fixture
def secret(tmp_path: Path) -> str:
    """A relay secret file."""
    path = tmp_path / "relay.key"
    path.write_bytes(b"cluster-relay-secret")
    return str(path)


def test_cluster_needs_the_relay_secret() -> None:
    """Without a relay secret the nodes could not pull from each other: usage error."""
    with pytest.raises(usage.UsageError, match="--relay-secret-file"):
        parse("--cluster", REDIS)


def test_cluster_excludes_upstream(secret: str) -> None:
    """A node follows the directory, not a static upstream."""
    with pytest.raises(usage.UsageError, match="exclude"):
        parse("--cluster", REDIS, "--relay-secret-file", secret, "--upstream", "ws://o:1")


def test_cluster_with_workers_needs_worker_relay_ports(secret: str) -> None:
    """Every worker is a node that other nodes must reach: without a port per worker,
    usage error naming the option; with one, accepted."""
    common = (
        "--cluster", REDIS, "--relay-secret-file", secret, "--workers", "2",
        "--listen", "tcp:8080", "--advertise", "ws://127.0.0.1:8080",
    )
    with pytest.raises(usage.UsageError, match="--worker-relay-ports"):
        parse(*common)
    assert parse(*common, "--worker-relay-ports", "9100").config().worker_relay_ports == 9100
    with pytest.raises(usage.UsageError, match="over 65535"):
        parse(*common, "--worker-relay-ports", "65535")


def test_worker_node_addresses() -> None:
    """Worker N gets port BASE+N-1 on the advertised host, bound there when it is an IP
    address, on every interface for a name; always plain ws://."""
    assert worker_node("ws://10.0.0.5:8080", 9100, 1) == WorkerNode(
        "ws://10.0.0.5:9100", "10.0.0.5", 9100
    )
    assert worker_node("wss://n1.example", 9100, 3) == WorkerNode("ws://n1.example:9102", "", 9102)
    assert worker_node("ws://[::1]:8080", 9000, 2) == WorkerNode("ws://[::1]:9001", "::1", 9001)
    with pytest.raises(ValueError, match="65535"):
        worker_node("ws://10.0.0.5:8080", 65535, 2)
    with pytest.raises(ValueError):
        worker_node("ws://10.0.0.5:8080", 0, 1)


def test_advertise_is_needed_when_the_port_is_not_known(secret: str) -> None:
    """With ``tcp:0`` (or a unix socket) nothing can be derived: usage error."""
    with pytest.raises(usage.UsageError, match="--advertise"):
        parse("--cluster", REDIS, "--relay-secret-file", secret, "--listen", "tcp:0")


def test_advertise_given_or_derived_from_the_first_listen_port(secret: str) -> None:
    """``--advertise`` wins; otherwise the first ``--listen`` port on loopback."""
    derived = parse("--cluster", REDIS, "--relay-secret-file", secret, "--listen", "tcp:8181")
    assert derived.advertise() == "ws://127.0.0.1:8181"
    given = parse(
        "--cluster", REDIS, "--relay-secret-file", secret, "--advertise", "wss://n1.example/"
    )
    assert given.advertise() == "wss://n1.example"
    assert given.config().cluster == REDIS and given.config().cluster_name == "streamrelay"


def test_no_cluster_by_default() -> None:
    """Nothing changes without ``--cluster``."""
    config = parse().config()
    assert config.cluster == "" and config.advertise == ""
