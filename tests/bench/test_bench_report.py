"""The harness's arithmetic: profile summaries, medians, and the targets as ratios."""

from __future__ import annotations

from typing import Any

from bench import report
from bench.environment import summarise_stacks

STACKS = """\
MainThread (1);run (app.py:10);doPoll (epoll.py:5);doWrite (abstract.py:7);send (tcp.py:3) 6
MainThread (1);run (app.py:10);doPoll (epoll.py:5);doRead (tcp.py:9) 3
MainThread (1);run (app.py:10);idle (epoll.py:2) 1
"""


def test_stacks_are_summarised_below_the_trunk() -> None:
    """Inclusive shares leave out frames in nearly every sample; self shares count leaves;
    line numbers do not split a function."""
    summary = summarise_stacks(STACKS)
    assert summary["samples"] == 10
    inclusive = dict(summary["inclusive"])
    assert "run (app.py)" not in inclusive
    assert inclusive["doPoll (epoll.py)"] == 90.0
    assert inclusive["doWrite (abstract.py)"] == 60.0
    assert dict(summary["self"])["send (tcp.py)"] == 60.0


def test_cells_give_median_and_spread() -> None:
    """A cell is the median with [min–max] over several runs, the value for one, — for none."""
    runs: list[dict[str, Any]] = [{"x": 3.0}, {"x": 1.0}, {"x": 2.0}, {"x": None}]
    assert report.cell(runs, "x") == "2.0 [1.0–3.0]"
    assert report.cell(runs[:1], "x") == "3.0"
    assert report.cell([], "x") == "—"


def _fanout(streamrelay: float, floor: float, websockets: float) -> dict:
    table = {
        "streamrelay": [{"cpu_us_per_msg": streamrelay, "p99_ms": 10.0,
                         "min_per_viewer_ratio": 1.0}],
        "floor": [{"cpu_us_per_msg": floor}],
        "websockets": [{"cpu_us_per_msg": websockets}],
    }
    return {"fanout": {"100 KB × 300": table}, "handshakes": {}, "idle": {}, "refused": []}


def test_targets_are_ratios_with_pass_and_miss() -> None:
    """CPU per message is compared with the floor and websockets of the same run."""
    rows = {row["target"]: row for row in report.ratios(_fanout(30.0, 20.0, 40.0))}
    floor = rows["100 KB × 300: streamrelay CPU/msg ÷ floor"]
    assert floor["value"] == 1.5 and floor["pass"] is False
    websockets = rows["100 KB × 300: streamrelay CPU/msg ÷ websockets"]
    assert websockets["value"] == 0.75 and websockets["pass"] is True
    assert rows["handshakes/s: streamrelay ÷ websockets"]["pass"] is None


def test_refused_handshakes_are_priced_net_of_accepted_ones() -> None:
    """A run under the rate limit pays for its few accepted handshakes at their own cost."""
    results = {
        "handshakes": {"streamrelay": [{"cpu_us_per_handshake": 500.0}]},
        "refused": [{"cpu_s": 1.05, "win_ok": 100, "win_refused": 10_000}],
    }
    assert report.refused_cost_us(results) == 100.0
    assert report.refused_ratio(results) == 0.2


def test_the_profile_lists_streamrelays_own_frames() -> None:
    """Frames from streamrelay's files get their own inclusive list."""
    leaf = "send_media (streamrelay/viewer_queue.py:9)"
    stacks = STACKS + f"MainThread (1);run (app.py:10);{leaf} 2\n"
    summary = summarise_stacks(stacks)
    assert summary["streamrelay"] == [("send_media (streamrelay/viewer_queue.py)", 100 * 2 / 12)]
