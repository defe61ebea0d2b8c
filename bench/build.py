"""Build the C load generators and the C floor peer with the machine's compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
PROGRAMS = {
    "viewers": HERE / "loadgen" / "viewers.c",
    "publisher": HERE / "loadgen" / "publisher.c",
    "handshakes": HERE / "loadgen" / "handshakes.c",
    "floor": HERE / "peers" / "floor.c",
}


def compiler() -> str:
    """$CC, else gcc, else cc; raises when there is none."""
    for candidate in (os.environ.get("CC"), "gcc", "cc"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError("no C compiler found (install gcc: apt-get install gcc)")


def build(out: Path = BUILD) -> dict[str, Path]:
    """Compile every program into ``out`` (rebuilt when a source is newer); name -> path."""
    out.mkdir(parents=True, exist_ok=True)
    cc = compiler()
    header = HERE / "loadgen" / "ws.h"
    built = {}
    for name, source in PROGRAMS.items():
        binary = out / name
        newest = max(source.stat().st_mtime, header.stat().st_mtime)
        if not binary.exists() or binary.stat().st_mtime < newest:
            subprocess.run(
                [cc, "-O2", "-Wall", "-o", str(binary), str(source)],
                check=True,
                timeout=120,
            )
        built[name] = binary
    return built
