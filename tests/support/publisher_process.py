"""The real desktop publisher (``python -m streamrelay.publisher``, the code behind
``streamrelay-publish``) as a process of its own: started against a relay with its output in
a log file, and stopped (a signal, then SIGKILL past a bound) whatever the test did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

REPOSITORY = Path(__file__).resolve().parents[2]


def publisher_command(*arguments: str) -> list[str]:
    """The publisher's command line with ``arguments``."""
    return [sys.executable, "-m", "streamrelay.publisher", *arguments]


def light_encode(size: str, fps: int, bitrate: str) -> list[str]:
    """The arguments of a light test-pattern encode: ``size`` (WxH) at ``fps`` with
    libx264's ultrafast preset at ``bitrate`` (e.g. "300k")."""
    return ["--size", size, "--fps", str(fps), "--preset", "ultrafast", "--bitrate", bitrate]


def publisher_environment(token: str | None = None) -> dict[str, str]:
    """The test's environment with this tree importable, and ``STREAMRELAY_TOKEN`` set to
    ``token`` (or removed: a token of the caller's shell must not reach the publisher)."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), *filter(None, [environment.get("PYTHONPATH")])]
    )
    environment.pop("STREAMRELAY_TOKEN", None)
    if token is not None:
        environment["STREAMRELAY_TOKEN"] = token
    return environment


def start_publisher(
    *arguments: str,
    log: Path,
    output: Literal["all", "stderr"] = "all",
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start the publisher with ``arguments`` in :func:`publisher_environment`. With
    ``output="all"`` its stdout and stderr are appended to ``log``; with ``"stderr"``
    only its stderr is kept, in ``log`` written afresh, and its stdout is discarded."""
    stderr_only = output == "stderr"
    with open(log, "wb" if stderr_only else "ab") as written:
        return subprocess.Popen(
            publisher_command(*arguments),
            env=publisher_environment(),
            cwd=None if cwd is None else str(cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if stderr_only else written,
            stderr=written if stderr_only else subprocess.STDOUT,
        )


def start_piped_publisher(*arguments: str, token: str | None = None) -> subprocess.Popen[str]:
    """Start the publisher with ``arguments`` in :func:`publisher_environment` (with
    ``token``), its stdout and stderr piped as text for the test to read."""
    return subprocess.Popen(
        publisher_command(*arguments),
        env=publisher_environment(token),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_publisher(
    process: subprocess.Popen[Any], timeout: float = 15.0, sig: int = signal.SIGTERM
) -> int:
    """Send ``sig`` (if it still runs) and wait up to ``timeout`` s for it to exit, then
    SIGKILL it; returns its exit status (negative when a signal ended it)."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@contextmanager
def running_publisher(
    *arguments: str, log: Path, **options: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`start_publisher` for the ``with`` block, stopped with SIGTERM at its end."""
    process = start_publisher(*arguments, log=log, **options)
    try:
        yield process
    finally:
        stop_publisher(process)


class PublisherProcesses:
    """Publishers a test starts (a fixture's), each logging to ``publisher-N.log`` in
    ``directory`` (or a log the caller names), stopped with SIGTERM by :meth:`stop_all`."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, *arguments: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start one with ``arguments`` (run in ``directory``)."""
        if log is None:
            log = self._directory / f"publisher-{len(self.started)}.log"
        process = start_publisher(*arguments, log=log, cwd=self._directory)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        """Stop every publisher started."""
        for process in self.started:
            stop_publisher(process)

    def __enter__(self) -> PublisherProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
