"""What the results must say about the machine: versions, cores, NVX; and the profile.

The servers run with the harness's own interpreter, so the NVX check runs there too, in
a child with the same environment (``AUTOBAHN_USE_NVX`` is honoured as the servers see it).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.servers import NODE_DIR, REPO

_NVX_PROBE = """
import os
from autobahn.websocket import HAS_NVX, USES_NVX
from autobahn.websocket import xormasker
masker = getattr(xormasker, "create_xor_masker", None)
print(HAS_NVX, USES_NVX, getattr(masker, "__module__", "?"))
"""


def nvx_status() -> str:
    """Whether Autobahn's native (NVX) masking is active for the servers."""
    done = subprocess.run(
        [sys.executable, "-c", _NVX_PROBE], capture_output=True, text=True, timeout=60
    )
    setting = os.environ.get("AUTOBAHN_USE_NVX", "unset")
    if done.returncode != 0:
        return f"UNKNOWN (probe failed: {done.stderr.strip()[-200:]})"
    has, uses, module = done.stdout.split()
    if uses == "True" and "nvx" in module:
        return f"active ({module}; AUTOBAHN_USE_NVX={setting})"
    return (
        f"INACTIVE: pure-Python masking (built: {has}; AUTOBAHN_USE_NVX={setting}); "
        "unmasking a 100 KiB publisher frame costs milliseconds"
    )


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    if done.returncode != 0:
        return "absent"
    return (done.stdout or done.stderr).strip().splitlines()[0]


def _module_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return "absent"


def facts(server_core: int, load_core: int) -> dict[str, Any]:
    """The machine and software the figures were measured on."""
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ws_version = "absent"
    package = NODE_DIR / "node_modules" / "ws" / "package.json"
    if package.exists():
        match = re.search(r'"version"\s*:\s*"([^"]+)"', package.read_text())
        ws_version = match.group(1) if match else "?"
    return {
        "host": platform.node(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "server_core": server_core,
        "load_core": load_core,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": _module_version("twisted"),
        "autobahn": _module_version("autobahn"),
        "websockets": _module_version("websockets"),
        "uvloop": _module_version("uvloop"),
        "node": _version(["node", "--version"]),
        "node_ws": ws_version,
        "gcc": _version([os.environ.get("CC", "gcc"), "--version"]),
        "nvx": nvx_status(),
        "git": _version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


def bench_extra() -> list[str]:
    """The ``bench`` extra of pyproject.toml (read without installing the project)."""
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib

        extras = tomllib.loads(text)["project"]["optional-dependencies"]
        return list(extras["bench"])
    except (ImportError, KeyError):
        return ["matplotlib>=3.7", "uvloop>=0.19", "py-spy>=0.3", "psutil>=5.9"]


def profile(bench: Any, spec: Any, seconds: float) -> dict[str, Any]:
    """Sample streamrelay with py-spy under 100 KB × 300 fan-out; the heaviest frames."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise RuntimeError("py-spy is not installed (bench/run --setup)")
    from bench.scenarios import now_us, sleep_until_us

    out = Path(tempfile.mkdtemp(prefix="bench-profile-")) / "stacks.txt"
    with bench.server(spec, "profile") as (server, port):
        view = bench.viewers(port, "profile-viewers", 300)
        view.event("ready", bench.connect_timeout)
        t0 = now_us() + 1_000_000
        t1 = t0 + int(seconds * 1e6)
        view.send(f"window {t0} {t1}")
        publisher = bench.publisher(
            port, "profile-publisher", size=100_000, fps=30, streams=1,
            seconds=(t1 - now_us()) / 1e6 + 0.5, window=(t0, t1),
        )
        sleep_until_us(t0)
        sampler = bench.children.start(
            "py-spy",
            [spy, "record", "--pid", str(server.pid), "--duration", str(int(seconds)),
             "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(out)],
            bench.load_core,
        )
        if sampler.wait(seconds + 30) is None:
            raise RuntimeError("py-spy did not finish")
        publisher.event("final", 30)
        view.send("stop")
        time.sleep(0.2)
    return summarise_stacks(out.read_text())


def summarise_stacks(text: str, top: int = 20) -> dict[str, Any]:
    """Inclusive and self shares of the frames in py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")[1:]]
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    if not total:
        return {"samples": 0, "inclusive": [], "streamrelay": [], "self": []}
    # The trunk (twistd, the reactor loop) is in nearly every sample and says nothing.
    branches = Counter({f: n for f, n in inclusive.items() if n < 0.95 * total})
    own_code = Counter({f: n for f, n in inclusive.items() if "streamrelay/" in f})
    return {
        "samples": total,
        "inclusive": [(frame, 100 * n / total) for frame, n in branches.most_common(top)],
        "streamrelay": [(frame, 100 * n / total) for frame, n in own_code.most_common(top)],
        "self": [(frame, 100 * n / total) for frame, n in own.most_common(top)],
    }
