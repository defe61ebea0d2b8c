"""The benchmark harness's quick mode, with tiny parameters, runs to the end.

No benchmark figure is asserted: on a shared machine they mean nothing here.  What is
checked is that the harness builds its C programs, runs streamrelay and the C floor (and
websockets, and Node's ws when node exists), writes its results page and a plot, and
leaves no process behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.bench, pytest.mark.timeout(240)]


def _section(page: str, title: str) -> str:
    """The text of one ``## title`` section of the results page."""
    start = page.index(f"## {title}\n")
    end = page.find("\n## ", start + 1)
    return page[start : end if end != -1 else len(page)]


def _run_and_watch(command: list[str], timeout: float) -> tuple[int, str, set[tuple[int, float]]]:
    """Run the harness; meanwhile note every descendant it starts (pid, start time)."""
    env = dict(os.environ)
    inherited = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + inherited if inherited else "")
    seen: set[tuple[int, float]] = set()
    with subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as harness:
        watched = psutil.Process(harness.pid)
        deadline = time.monotonic() + timeout
        while harness.poll() is None and time.monotonic() < deadline:
            try:
                for child in watched.children(recursive=True):
                    try:
                        seen.add((child.pid, child.create_time()))
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(0.1)
        if harness.poll() is None:
            harness.kill()
        output = harness.stdout.read().decode(errors="replace") if harness.stdout else ""
        return harness.wait(), output, seen


def _leftovers(seen: set[tuple[int, float]]) -> list[str]:
    """Processes the harness started that still run (a recycled pid does not count)."""
    left = []
    for pid, created in seen:
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid}: {' '.join(process.cmdline())}")
        except psutil.Error:
            pass
    return left


def test_quick_mode_runs_to_the_end(tmp_path: Path) -> None:
    """Quick mode with 5 viewers, 1 s windows and one repeat writes a results page with
    streamrelay's and the floor's rows in every scenario, a PNG plot, and ends every
    process it started; Node's ws runs when node exists, else the page says it did not."""
    command = [
        sys.executable, "-m", "bench", "--quick", "--viewers", "5", "--seconds", "1",
        "--repeats", "1", "--idle-viewers", "20",
        "--servers", "streamrelay,floor,websockets,node", "--out", str(tmp_path),
    ]
    status, output, seen = _run_and_watch(command, timeout=200)
    assert status == 0, output[-4000:]
    pages = list(tmp_path.glob("*.md"))
    assert len(pages) == 1, output[-2000:]
    page = pages[0].read_text()
    for title in ("Fan-out", "Idle viewers", "Handshakes"):
        section = _section(page, title)
        for row in ("| streamrelay (twistd) |", "| C floor (epoll) |"):
            assert row in section, f"{row} missing from {title}:\n{page}"
    assert "Autobahn NVX masking acceleration:" in page
    assert "## Where streamrelay stands" in page
    if shutil.which("node") is None:
        assert "Node.js ws: NOT RUN" in page
    plots = list(tmp_path.glob("*.png"))
    assert plots, page
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)
    assert seen, "the harness started no process"
    assert _leftovers(seen) == []
