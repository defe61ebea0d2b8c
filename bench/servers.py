"""The servers under test, each launched the way its users launch it.

All listen on 127.0.0.1, serve ``/publish/NAME`` and ``/watch/NAME`` and echo the
``streamrelay.v1`` subprotocol.  streamrelay runs through twistd with the options the
load needs (every client comes from 127.0.0.1, so the per-address limits are raised);
``streamrelay-limited`` is the same launch with the default limits, used only to measure
what a handshake refused by the rate limit costs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.build import HERE

REPO = HERE.parent
PEERS = HERE / "peers"
NODE_DIR = PEERS / "node"
TWISTD = str(Path(sys.executable).with_name("twistd"))

# Why each option: the load generator's clients all come from 127.0.0.1.
#   --max-connections-per-ip 100000   default 100; 1,000 viewers or 5,000 idle ones share
#                                     one address
#   --max-handshakes-per-ip 1000000   default 50/s (burst 100); the handshake and storm scenarios
#                                     open thousands per second from one address
#   --max-connections 100000          default 10,000; room for 5,000 idle viewers plus the storm
STREAMRELAY_OPTIONS = [
    "--max-connections-per-ip",
    "100000",
    "--max-handshakes-per-ip",
    "1000000",
    "--max-connections",
    "100000",
]


@dataclass
class Server:
    """One server under test."""

    key: str
    label: str
    command: Callable[[int, dict[str, Path]], list[str]]
    missing: Callable[[], str | None] = lambda: None
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    note: str = ""


def _streamrelay(extra: list[str]) -> Callable[[int, dict[str, Path]], list[str]]:
    def command(port: int, built: dict[str, Path]) -> list[str]:
        return [
            TWISTD,
            "-n",
            "--pidfile=",
            "streamrelay",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
        ]

    return command


def _python(script: str, *extra: str) -> Callable[[int, dict[str, Path]], list[str]]:
    return lambda port, built: [sys.executable, str(PEERS / script), str(port), *extra]


def _uvloop_missing() -> str | None:
    done = subprocess.run(
        [sys.executable, "-c", "import uvloop"], capture_output=True, timeout=30
    )
    return None if done.returncode == 0 else "uvloop is not installed (pip install uvloop)"


def node_missing(install: bool = True) -> str | None:
    """None when the Node peer can run; installs ``ws`` with npm at run time if needed."""
    if not shutil.which("node"):
        return "node not found on PATH (apt-get install nodejs npm)"
    if not (NODE_DIR / "node_modules" / "ws").is_dir():
        if not install or not shutil.which("npm"):
            return "the ws package is not installed (npm not found)"
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_DIR,
            capture_output=True,
            timeout=300,
        )
        if done.returncode != 0:
            return "npm install ws failed: " + done.stderr.decode(errors="replace")[-300:]
    return None


def _pythonpath() -> dict[str, str]:
    current = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(REPO) + (os.pathsep + current if current else "")}


SERVERS: dict[str, Server] = {
    server.key: server
    for server in [
        Server(
            "streamrelay",
            "streamrelay (twistd)",
            _streamrelay(STREAMRELAY_OPTIONS),
            env=_pythonpath(),
            note="twistd -n --pidfile= streamrelay --listen tcp:PORT:interface=127.0.0.1 "
            + " ".join(STREAMRELAY_OPTIONS),
        ),
        Server(
            "autobahn",
            "naive Autobahn",
            _python("autobahn_relay.py"),
            note="sendMessage to each viewer in a loop (epoll reactor)",
        ),
        Server(
            "websockets",
            "websockets broadcast()",
            _python("websockets_relay.py"),
            note="asyncio default loop",
        ),
        Server(
            "websockets-uvloop",
            "websockets on uvloop",
            _python("websockets_relay.py", "--uvloop"),
            missing=_uvloop_missing,
        ),
        Server(
            "node",
            "Node.js ws",
            lambda port, built: ["node", str(NODE_DIR / "relay.js"), str(port)],
            missing=node_missing,
            note="perMessageDeflate off, jsmpeg-style send loop",
        ),
        Server(
            "floor",
            "C floor (epoll)",
            lambda port, built: [str(built["floor"]), str(port)],
            note="frames once, writes the same bytes to every socket",
        ),
    ]
}

def other_tree(path: Path) -> Server:
    """streamrelay from another work tree (say, main beside a branch), launched the same
    way: for before/after comparisons in one run."""
    tree = path.resolve()
    if not (tree / "streamrelay" / "__init__.py").exists():
        raise SystemExit(f"--compare-tree {path}: no streamrelay package there")
    return Server(
        "streamrelay-other",
        f"streamrelay ({tree.name})",
        _streamrelay(STREAMRELAY_OPTIONS),
        env={"PYTHONPATH": str(tree)},
        cwd=tree,
        note=f"the same launch from {tree}",
    )


LIMITED = Server(
    "streamrelay-limited",
    "streamrelay, default limits",
    _streamrelay([]),
    env=_pythonpath(),
    note="default --max-handshakes-per-ip 50 (burst 100): most handshakes refused with 503",
)
