"""Child processes of the harness: pinned to a core, owned, measured, always killed.

Every child starts in its own session (its own process group) with ``RLIMIT_NOFILE``
raised to the hard limit and a parent-death signal (it is killed if the harness dies),
pinned with ``taskset`` (or ``sched_setaffinity`` where taskset is missing).
:class:`Children` remembers each one and kills every group it started when the run
ends, whatever way it ends.  CPU and memory are read from /proc (schedstat, through
psutil for the tree) for a process and all its descendants.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import psutil

SERVER_CORE = 0
LOAD_CORE = 1


def cores() -> tuple[int, int]:
    """(server core, load-generator core); the same core twice on a one-core machine."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) >= 2:
        return available[0], available[1]
    return available[0], available[0]


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this child if the harness dies first (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, child: Child, timeout: float) -> None:
    """Return once 127.0.0.1:port accepts connections; raise if the child dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.poll()} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{child.name} did not listen on {port} within {timeout} s")


def _task_cpu_ns(pid: int) -> int:
    """CPU nanoseconds of every live thread of ``pid`` (/proc/PID/task/*/schedstat).

    schedstat counts in nanoseconds where utime+stime count in clock ticks (10 ms): a
    2-second window at thousands of messages a second needs the finer clock.
    """
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) of ``pid`` and its live descendants."""
    try:
        root = psutil.Process(pid)
        pids = [root.pid] + [child.pid for child in root.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    if os.path.exists(f"/proc/{pid}/task"):
        return sum(_task_cpu_ns(p) for p in pids) / 1e9
    total = 0.0
    for p in pids:
        try:
            times = psutil.Process(p).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def core_ticks(core: int) -> tuple[int, int]:
    """(busy, total) clock ticks of one core so far, from /proc/stat (busy includes
    irq and softirq; idle and iowait do not count)."""
    try:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith(f"cpu{core} "):
                    fields = [int(x) for x in line.split()[1:9]]
                    total = sum(fields)
                    return total - fields[3] - fields[4], total
    except (OSError, ValueError):
        pass
    return 0, 0


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """How busy a core was between two :func:`core_ticks` readings, in percent."""
    total = after[1] - before[1]
    return 100 * (after[0] - before[0]) / total if total > 0 else None


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its live descendants."""
    try:
        root = psutil.Process(pid)
        total = 0
        for proc in [root, *root.children(recursive=True)]:
            try:
                total += int(proc.memory_info().rss)
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


class Child:
    """One child process; JSON lines it prints on stdout are collected when ``events``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        core: int,
        log: IO[bytes],
        *,
        events: bool = False,
        stdin: bool = False,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        command = list(argv)
        taskset = shutil.which("taskset")
        if taskset:
            command = [taskset, "-c", str(core), *command]

        def prepare() -> None:
            _die_with_parent()
            _raise_nofile()
            if not taskset:
                os.sched_setaffinity(0, {core})

        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if events else log,
            stderr=log,
            env=env,
            cwd=str(cwd) if cwd else None,
            preexec_fn=prepare,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        if events:
            thread = threading.Thread(target=self._read, daemon=True)
            thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                self._lines.put(json.loads(raw))
            except ValueError:
                continue

    def poll(self) -> int | None:
        """The exit status, or None while running."""
        return self.process.poll()

    def send(self, line: str) -> None:
        """Write a command line to the child's stdin."""
        assert self.process.stdin is not None
        self.process.stdin.write((line + "\n").encode())
        self.process.stdin.flush()

    def event(self, kind: str, timeout: float) -> dict[str, Any]:
        """The next JSON line whose ``event`` is ``kind``; raises on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {kind!r} event within {timeout:.0f} s")
            try:
                line = self._lines.get(timeout=min(left, 0.25))
            except queue.Empty:
                if self.poll() is not None and self._lines.empty():
                    raise RuntimeError(
                        f"{self.name} exited with {self.poll()} before a {kind!r} event"
                    ) from None
                continue
            if line.get("event") == kind:
                return line

    def request(self, command: str, kind: str, timeout: float) -> dict[str, Any]:
        """Send ``command`` and return the next ``kind`` event."""
        self.send(command)
        return self.event(kind, timeout)

    def cpu(self) -> float:
        """CPU seconds of this child and its descendants."""
        return tree_cpu_seconds(self.pid)

    def rss(self) -> int:
        """Resident bytes of this child and its descendants."""
        return tree_rss(self.pid)

    def wait(self, timeout: float) -> int | None:
        """Wait for exit up to ``timeout`` seconds; the status or None."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
        # Signals go to the group only while its leader is unreaped: a reaped pid may
        # belong to someone else's process later.
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            if self.wait(grace) is None:
                self._signal(signal.SIGKILL)
                self.wait(5.0)
        for stream in (self.process.stdin, self.process.stdout):
            if stream:
                try:
                    stream.close()
                except OSError:
                    pass

    def _signal(self, number: int) -> None:
        try:
            os.killpg(self.pid, number)
        except (ProcessLookupError, PermissionError):
            pass


class Children:
    """Every child the harness started, so that all can be killed at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._children: list[Child] = []
        self._logs: list[IO[bytes]] = []

    def start(self, name: str, argv: Sequence[str], core: int, **kwargs: Any) -> Child:
        """Start and remember a child; its stderr (and stdout unless events) go to a log."""
        log = open(self.log_dir / f"{name}.log", "ab")
        self._logs.append(log)
        child = Child(name, argv, core, log, **kwargs)
        self._children.append(child)
        return child

    def stop(self, child: Child, grace: float = 3.0) -> None:
        """Stop one child now."""
        child.stop(grace)

    def alive(self) -> list[int]:
        """Pids of remembered children still running."""
        return [child.pid for child in self._children if child.poll() is None]

    def kill_all(self) -> None:
        """SIGKILL every group ever started (idempotent) and close the logs."""
        for child in self._children:
            child.stop(grace=0.5)
        self._children.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
