"""The ``streamrelay`` console script's options: twistd's plugin options plus
``--reactor``, usage errors with status 2.  (Running it is tested against the real
process in tests/integration/test_operations.py.)"""

from __future__ import annotations

import pytest

from streamrelay import cli, tap


def test_same_options_and_defaults_as_the_twistd_plugin() -> None:
    """Every option of ``twistd streamrelay`` is there, with the same defaults."""
    console = cli.parse([])
    plugin = tap.Options()
    plugin.parseOptions([])
    assert console.config() == plugin.config()
    assert set(plugin.longOpt) <= set(console.longOpt)
    assert {"reactor=", "help-reactors"} <= set(console.longOpt)
    assert console["listen"] == ["tcp:8080"]


def test_options_reach_the_config() -> None:
    """Options are parsed as for twistd."""
    console = cli.parse(["--trust-proxy", "2", "--json-logs", "--listen", "tcp:0"])
    assert console.config().trust_proxy == 2
    assert console.config().json_logs is True
    assert console["listen"] == ["tcp:0"]


@pytest.mark.parametrize(
    "arguments",
    [["--trust-proxy", "-1"], ["--no-such-option"], ["--listen", "bogus:1"], ["extra"]],
)
def test_usage_errors_exit_2_with_the_reason(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad command line exits with status 2 and says why, then the usage."""
    with pytest.raises(SystemExit) as exited:
        cli.parse(arguments)
    assert exited.value.code == cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert error.startswith("streamrelay: ")
    assert "--listen" in error and "Usage: streamrelay [options]" in error


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version names streamrelay's version, status 0."""
    with pytest.raises(SystemExit) as exited:
        cli.parse(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == "streamrelay 0.1.0"


def test_help_mentions_the_reactor_and_sigterm(capsys: pytest.CaptureFixture[str]) -> None:
    """--help documents --reactor and how SIGTERM ends the process."""
    with pytest.raises(SystemExit):
        cli.parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--reactor=" in text and "exits with status 0" in text


def test_importing_the_relay_installs_no_reactor() -> None:
    """``--reactor`` can only work if nothing imported before the options are parsed
    installs the default reactor (a fresh interpreter, so nothing is cached)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, streamrelay.cli, streamrelay.tap, streamrelay.web\n"
        "print('twisted.internet.reactor' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
