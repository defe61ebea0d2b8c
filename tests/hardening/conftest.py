"""Hardening suite fixtures: a summary of every figure at the end of the run."""

from __future__ import annotations

import json
from typing import Any

from tests.support.figures import FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """List the figures the hardening tests measured."""
    if not FIGURES:
        return
    terminalreporter.section("hardening figures")
    for entry in FIGURES:
        terminalreporter.write_line(
            f"{entry['figure']}: {json.dumps(entry['values'], sort_keys=True)}"
        )
