"""The relay installs without PyAV; the publisher is the ``publisher`` extra."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamrelay.publisher import cli

REPOSITORY = Path(__file__).resolve().parent.parent

# Makes ``import av`` fail the way it does where PyAV is not installed.
WITHOUT_AV = "import sys; sys.modules['av'] = None; "


def run_without_av(code: str) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), *filter(None, [environment.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_AV + code],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_relay_and_the_publishers_network_side_import_without_pyav() -> None:
    """Without PyAV the relay (its twistd plugin and modules) imports, and so do the
    publisher's network side and H.264 packaging; only the encoder needs PyAV."""
    result = run_without_av(
        "import twisted.plugins.streamrelay_plugin, streamrelay.tap, streamrelay.web, "
        "streamrelay.demo; "
        "from streamrelay.publisher import H264Packager, Publisher, PublisherSettings; "
        "Publisher(PublisherSettings()); "
        "from streamrelay.publisher.status import StatusLine\n"
        "try:\n"
        "    from streamrelay.publisher import H264Encoder\n"
        "except ImportError:\n"
        "    print('encoder needs PyAV')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "encoder needs PyAV"


def test_the_command_without_pyav_says_which_extra_to_install() -> None:
    """``python -m streamrelay.publisher`` (like ``streamrelay-publish``) without PyAV
    exits with status 1 and one line naming the extra, not a traceback."""
    result = run_without_av(
        "import runpy; sys.argv = ['streamrelay-publish', '--help']; "
        "runpy.run_module('streamrelay.publisher', run_name='__main__')"
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamrelay-publish: PyAV is not available")
    assert "pip install 'streamrelay[publisher]'" in lines[0]


def test_main_checks_for_pyav_before_anything_else(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """main() reports a missing PyAV before parsing arguments or touching the reactor."""
    monkeypatch.setitem(sys.modules, "av", None)
    assert cli.main(["--no-such-option"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and cli.INSTALL_HINT in captured.err


def test_pyproject_keeps_pyav_in_the_publisher_extra() -> None:
    """``pip install streamrelay`` brings no PyAV; ``streamrelay[publisher]`` does, the
    test extra pulls the publisher extra, and the console script is declared."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    assert not any(requirement.startswith("av") for requirement in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(requirement.startswith("av>=") for requirement in extras["publisher"])
    assert "streamrelay[publisher]" in extras["test"]
    assert project["scripts"]["streamrelay-publish"] == "streamrelay.publisher.cli:main"
    assert '".[publisher]"' in (REPOSITORY / "scripts" / "demo").read_text()
