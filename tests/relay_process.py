"""Launch the real plugin, as users do: ``twistd -n --pidfile= streamrelay ...``.

The relay listens on ``tcp:0`` on loopback and logs the address it bound; the launcher
reads it from the log.  ``STREAMRELAY_TEST_REACTOR`` picks the reactor (epoll, poll,
select, asyncio) so the whole integration suite runs under each.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

_LISTENING = re.compile(r"streamrelay listening on \S+ (https?)://([^/]+)/")
TWISTD = str(Path(sys.executable).with_name("twistd"))


def reactor_name() -> str | None:
    """The reactor chosen for this test run, or None for twistd's default."""
    return os.environ.get("STREAMRELAY_TEST_REACTOR") or None


class RelayProcess:
    """One relay process with its captured log."""

    def __init__(
        self,
        log_path: Path,
        arguments: list[str] = (),  # type: ignore[assignment]
        environment: dict[str, str] | None = None,
        listen: str = "tcp:0:interface=127.0.0.1",
        reactor: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.log_path = log_path
        command = [TWISTD, "-n", "--pidfile="]
        chosen = reactor or reactor_name()
        if chosen:
            command.append(f"--reactor={chosen}")
        command += ["streamrelay", "--listen", listen, *arguments]
        self.command = command
        env = dict(os.environ)
        env.pop("STREAMRELAY_PUBLISH_SECRET", None)
        env.pop("STREAMRELAY_VIEW_SECRET", None)
        env.update(environment or {})
        self._log_file = open(log_path, "ab")
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd or log_path.parent),
        )
        self.psutil = psutil.Process(self.process.pid)
        self.http_url, self.ws_url = self._wait_for_address()
        self.port = int(self.http_url.rsplit(":", 1)[1].rstrip("/"))

    def _wait_for_address(self, timeout: float = 20.0) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()
            match = _LISTENING.search(text)
            if match:
                scheme, hostport = match.groups()
                ws_scheme = "wss" if scheme == "https" else "ws"
                return f"{scheme}://{hostport}", f"{ws_scheme}://{hostport}"
            if self.process.poll() is not None:
                raise RuntimeError(f"relay exited with {self.process.returncode}:\n{text}")
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f"relay did not report its address in {timeout} s:\n{self.log_text()}")

    def log_text(self) -> str:
        """Everything the relay logged so far."""
        return self.log_path.read_text("utf-8", "replace")

    def rss(self) -> int:
        """The relay's resident memory in bytes."""
        return int(self.psutil.memory_info().rss)

    def open_files(self) -> int:
        """The relay's open file descriptors."""
        return int(self.psutil.num_fds())

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit status (-15 / 143 after a clean stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log_file.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the relay (a crash)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()
