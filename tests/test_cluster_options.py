"""``--cluster`` on the command line: what it needs, what it refuses, what it derives."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

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


def test_cluster_excludes_workers(secret: str) -> None:
    """--workers with --cluster is refused with a message saying what to do instead."""
    with pytest.raises(usage.UsageError, match="one cluster node per process"):
        parse(
            "--cluster",
            REDIS,
            "--relay-secret-file",
            secret,
            "--workers",
            "2",
            "--listen",
            "tcp:8080",
            "--advertise",
            "ws://127.0.0.1:8080",
        )


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
