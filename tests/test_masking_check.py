"""The start-up check that Autobahn unmasks publisher frames natively (NVX)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from autobahn.websocket import USES_NVX
from autobahn.websocket import protocol as websocket_protocol

from streamrelay import tap
from tests.fakes import captured_log


class PurePythonMasker:
    """Stands in for Autobahn's pure-Python masker (absent from an NVX build)."""

    def __init__(self, mask: bytes, length: int | None = None) -> None:
        self.mask = mask


PurePythonMasker.__module__ = "autobahn.websocket.xormasker"


def _warnings(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "NVX" in str(e.get("log_format", ""))]


def test_the_check_agrees_with_autobahn() -> None:
    """In this environment the check says what Autobahn itself decided."""
    assert tap.masking_accelerated() is USES_NVX


def test_pure_python_masking_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    """When Autobahn's protocol would use a pure-Python masker, start-up logs a warning
    that names the cause and the fix."""
    monkeypatch.setattr(websocket_protocol, "create_xor_masker", PurePythonMasker)
    with captured_log() as log:
        assert tap.warn_unless_masking_accelerated() is False
    [warning] = _warnings(log.events)
    assert warning["log_level"].name == "warn"
    assert "AUTOBAHN_USE_NVX" in warning["log_format"]


@pytest.mark.skipif(not USES_NVX, reason="needs an autobahn built with NVX")
def test_native_masking_is_not_warned_about() -> None:
    """With NVX active nothing is logged."""
    with captured_log() as log:
        assert tap.warn_unless_masking_accelerated() is True
    assert _warnings(log.events) == []


def test_makeservice_runs_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the service runs the check."""
    seen: list[bool] = []
    monkeypatch.setattr(tap, "warn_unless_masking_accelerated", lambda: seen.append(True))
    # Leave this process's descriptor limit alone.
    monkeypatch.setattr(tap, "_fit_descriptor_limit", lambda reactor, wanted: wanted)
    options = tap.Options()
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1"])
    tap.makeService(options)
    assert seen == [True]


def test_autobahn_use_nvx_0_is_detected() -> None:
    """``AUTOBAHN_USE_NVX=0`` (read by Autobahn at import) turns native masking off, and
    the check sees it, in a fresh interpreter."""
    environment = dict(os.environ, AUTOBAHN_USE_NVX="0")
    result = subprocess.run(
        [sys.executable, "-c", "from streamrelay import tap; print(tap.masking_accelerated())"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "False"
