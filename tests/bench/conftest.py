"""The ``bench`` marker, registered here so the smoke test can be selected or left out."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of the benchmark harness's smoke test."""
    config.addinivalue_line("markers", "bench: runs the benchmark harness (bench/) end to end")
