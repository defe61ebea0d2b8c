"""Figures the stress tests measure: printed, kept for the end-of-run summary, and
written under ``$STREAMRELAY_ARTIFACTS`` when that is set."""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Every figure recorded in this run, for the hardening suite's terminal summary.
FIGURES: list[dict[str, Any]] = []


def artifacts_folder() -> Path | None:
    """``$STREAMRELAY_ARTIFACTS`` (created if needed), or None when it is not set."""
    folder = os.environ.get("STREAMRELAY_ARTIFACTS")
    if not folder:
        return None
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_artifact(name: str, data: dict[str, Any]) -> Path | None:
    """Write ``data`` as JSON to ``$STREAMRELAY_ARTIFACTS/name`` when that is set."""
    folder = artifacts_folder()
    if folder is None:
        return None
    target = folder / name
    target.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", "utf-8")
    return target


def record_figure(name: str, **values: Any) -> dict[str, Any]:
    """Print a test's figure and append it to ``$STREAMRELAY_ARTIFACTS/hardening.json``
    (a JSON array of ``{"figure", "recorded_at", "reactor", "values"}``) when set."""
    entry = {
        "figure": name,
        "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "reactor": os.environ.get("STREAMRELAY_TEST_REACTOR") or "default",
        "values": values,
    }
    FIGURES.append(entry)
    print(f"FIGURE {name}: {json.dumps(values, sort_keys=True)}", flush=True)
    folder = artifacts_folder()
    if folder is not None:
        path = folder / "hardening.json"
        existing: list[Any] = []
        if path.exists():
            try:
                loaded = json.loads(path.read_text("utf-8") or "[]")
                existing = loaded if isinstance(loaded, list) else [loaded]
            except ValueError:
                path.replace(path.with_suffix(".json.unreadable"))
        existing.append(entry)
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n", "utf-8")
        temporary.replace(path)
    return entry


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def rounded(value: float, digits: int = 3) -> float:
    """A float fit for a figure."""
    return round(float(value), digits)
