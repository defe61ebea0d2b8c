"""``python -m bench`` / ``bench/run``: run the scenarios against every server, alternating.

Each scenario runs its load against each server in turn, the order rotated on every
repeat, so that drift on a shared machine spreads over all servers alike; the report
gives medians and the spread.  Quick mode (about a minute) runs a subset; ``--setup``
installs the harness's own extras (matplotlib, uvloop, py-spy, the Node ``ws`` package).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import environment, report
from bench.build import BUILD, build
from bench.procs import Children, cores
from bench.scenarios import Bench
from bench.servers import LIMITED, NODE_DIR, SERVERS, Server, node_missing, other_tree

RESULTS = Path(__file__).resolve().parent / "results"
ALL_SCENARIOS = ("fanout", "saturation", "idle", "handshakes", "storm", "slow")


@dataclass
class Plan:
    """What one run measures, and how long each measurement lasts."""

    mode: str
    fanout: list[dict[str, Any]]
    repeats: int
    seconds: float
    warm: float
    saturation: dict[str, Any] | None
    idle_viewers: int
    handshake_seconds: float
    handshake_repeats: int
    storm_viewers: int
    slow: dict[str, Any] | None
    scenarios: tuple[str, ...] = ALL_SCENARIOS
    profile: bool = False
    notes: list[str] = field(default_factory=list)


def case(size: int, viewers: int, streams: int = 1) -> dict[str, Any]:
    """A fan-out case: message size in bytes, viewers in all, streams."""
    label = f"{size // 1000} KB × {viewers}"
    if streams > 1:
        label = f"{size // 1000} KB, {streams} streams × {viewers // streams}"
    return {"key": label, "size": size, "viewers": viewers, "streams": streams}


def quick_plan() -> Plan:
    """About a minute: one fan-out case, handshakes, 500 idle viewers."""
    return Plan(
        mode="quick",
        fanout=[case(100_000, 100)],
        repeats=2,
        seconds=1.5,
        warm=0.6,
        saturation=None,
        idle_viewers=500,
        handshake_seconds=1.5,
        handshake_repeats=1,
        storm_viewers=0,
        slow=None,
        scenarios=("fanout", "idle", "handshakes"),
    )


def full_plan() -> Plan:
    """Every scenario of the issue at its full size."""
    return Plan(
        mode="full",
        fanout=[
            case(100_000, 100),
            case(100_000, 300),
            case(20_000, 100),
            case(20_000, 300),
            case(20_000, 1000),
            case(20_000, 300, streams=10),
        ],
        repeats=3,
        seconds=4.0,
        warm=1.0,
        saturation={
            "size": 20_000,
            "viewers": 100,
            # ×1.5 a step from 30 fps until the server falls behind (14 steps at most)
            "steps": [round(30 * 1.5**k) for k in range(14)],
            "seconds": 2.5,
        },
        idle_viewers=5000,
        handshake_seconds=3.0,
        handshake_repeats=3,
        storm_viewers=2000,
        # 100 KB × 30 fps for 4 s puts 12 MB towards the slow viewer: past streamrelay's
        # 4 MiB --viewer-queue-bytes, so its drop-to-keyframe path runs.
        slow={"size": 100_000, "viewers": 100, "seconds": 4.0},
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the one-minute subset")
    parser.add_argument("--setup", action="store_true",
                        help="install the bench extras into this Python and npm's ws, then exit")
    parser.add_argument("--servers", help="comma list (default: all available): "
                        + ",".join(SERVERS))
    parser.add_argument("--scenarios", help="comma list of: " + ",".join(ALL_SCENARIOS))
    parser.add_argument("--case", action="append", metavar="BYTESxVIEWERS[xSTREAMS]",
                        help="fan-out case(s) instead of the mode's, e.g. 100000x300 or "
                        "20000x300x10 (repeatable)")
    parser.add_argument("--viewers", type=int, help="viewers in every fan-out case")
    parser.add_argument("--seconds", type=float, help="measurement window per run")
    parser.add_argument("--repeats", type=int, help="repeats of fan-out and handshakes")
    parser.add_argument("--idle-viewers", type=int, help="viewers in the idle scenario")
    parser.add_argument("--storm-viewers", type=int, help="viewers in the reload storm")
    parser.add_argument("--compare-tree", type=Path, metavar="PATH",
                        help="also run streamrelay from another work tree (e.g. main)")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy profile of streamrelay under 100 KB × 300 fan-out")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """The mode's plan with the command line's overrides."""
    plan = quick_plan() if args.quick else full_plan()
    if args.scenarios:
        wanted = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
        unknown = set(wanted) - set(ALL_SCENARIOS)
        if unknown:
            raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
        plan.scenarios = wanted
    if args.case:
        plan.fanout = []
        for text in args.case:
            try:
                numbers = [int(part) for part in text.lower().split("x")]
                plan.fanout.append(case(*numbers))
            except (TypeError, ValueError):
                raise SystemExit(
                    f"--case {text!r}: want BYTESxVIEWERS or BYTESxVIEWERSxSTREAMS"
                ) from None
    if args.viewers:
        for item in plan.fanout:
            item["viewers"] = max(args.viewers, item["streams"])
            item.update(case(item["size"], item["viewers"], item["streams"]))
        if plan.slow:
            plan.slow["viewers"] = args.viewers
        if plan.saturation:
            plan.saturation["viewers"] = args.viewers
        plan.notes.append(f"viewers overridden: {args.viewers}")
    if args.seconds:
        plan.seconds = args.seconds
        plan.handshake_seconds = args.seconds
        plan.warm = min(plan.warm, max(0.3, args.seconds / 2))
        if plan.saturation:
            plan.saturation["seconds"] = args.seconds
        if plan.slow:
            plan.slow["seconds"] = args.seconds
    if args.repeats:
        plan.repeats = args.repeats
        plan.handshake_repeats = args.repeats
    if args.idle_viewers is not None:
        plan.idle_viewers = args.idle_viewers
    if args.storm_viewers is not None:
        plan.storm_viewers = args.storm_viewers
    plan.profile = args.profile
    return plan


def setup() -> int:
    """Install the bench extra's packages into this interpreter, and ws with npm."""
    packages = environment.bench_extra()
    print(f"installing into {sys.executable}: {' '.join(packages)}")
    code = subprocess.call([sys.executable, "-m", "pip", "install", *packages])
    if shutil.which("npm"):
        code |= subprocess.call(["npm", "install", "--no-audit", "--no-fund"], cwd=NODE_DIR)
    else:
        print("npm not found: the Node.js ws peer will be skipped (apt-get install nodejs npm)")
    return code


def rotated(items: list[Server], by: int) -> list[Server]:
    """``items`` rotated left by ``by``: each repeat starts with another server."""
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


class Runner:
    """Runs the plan's scenarios, collecting results and errors."""

    def __init__(self, plan: Plan, bench: Bench, servers: list[Server]) -> None:
        self.plan = plan
        self.bench = bench
        self.servers = servers
        self.results: dict[str, Any] = {name: {} for name in ALL_SCENARIOS}
        self.results["refused"] = []
        self.errors: list[str] = []

    def attempt(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one measurement; an exception is recorded, not raised."""
        started = time.monotonic()
        try:
            result = function(*args, **kwargs)
        except KeyboardInterrupt:
            raise
        except Exception as error:  # noqa: BLE001 - one failed measurement must not end the run
            message = f"{what}: {type(error).__name__}: {error}"
            self.errors.append(message)
            log(f"  ERROR {message}")
            return None
        log(f"  {what}: {summary(result)} ({time.monotonic() - started:.1f} s)")
        return result

    def run(self) -> None:
        """Every scenario of the plan, in order."""
        for name in self.plan.scenarios:
            getattr(self, f"run_{name}")()
        if self.plan.profile:
            self.run_profile()

    def run_fanout(self) -> None:
        for item in self.plan.fanout:
            table = self.results["fanout"].setdefault(item["key"], {})
            for repeat in range(self.plan.repeats):
                for spec in rotated(self.servers, repeat):
                    result = self.attempt(
                        f"fan-out {item['key']} · {spec.key} · {repeat + 1}/{self.plan.repeats}",
                        self.bench.fanout, spec, size=item["size"], viewers=item["viewers"],
                        streams=item["streams"], seconds=self.plan.seconds, warm=self.plan.warm,
                    )
                    if result:
                        table.setdefault(spec.key, []).append(result)

    def run_saturation(self) -> None:
        if not self.plan.saturation:
            return
        config = self.plan.saturation
        for spec in self.servers:
            result = self.attempt(
                f"saturation {config['size'] // 1000} KB × {config['viewers']} · {spec.key}",
                self.bench.saturation, spec, size=config["size"], viewers=config["viewers"],
                steps=config["steps"], seconds=config["seconds"],
            )
            if result:
                self.results["saturation"][spec.key] = result

    def run_idle(self) -> None:
        if not self.plan.idle_viewers:
            return
        for spec in self.servers:
            result = self.attempt(
                f"idle {self.plan.idle_viewers} · {spec.key}",
                self.bench.idle, spec, viewers=self.plan.idle_viewers,
            )
            if result:
                self.results["idle"].setdefault(spec.key, []).append(result)

    def run_handshakes(self) -> None:
        seconds = self.plan.handshake_seconds
        for repeat in range(self.plan.handshake_repeats):
            for spec in rotated(self.servers, repeat):
                result = self.attempt(
                    f"handshakes · {spec.key} · {repeat + 1}/{self.plan.handshake_repeats}",
                    self.bench.handshakes, spec, seconds=seconds,
                )
                if result:
                    self.results["handshakes"].setdefault(spec.key, []).append(result)
            if any(spec.key == "streamrelay" for spec in self.servers):
                result = self.attempt(
                    f"refused handshakes · streamrelay (default limits) · {repeat + 1}",
                    self.bench.handshakes, LIMITED, seconds=seconds,
                )
                if result:
                    self.results["refused"].append(result)

    def run_storm(self) -> None:
        if not self.plan.storm_viewers:
            return
        for spec in self.servers:
            result = self.attempt(
                f"reload storm {self.plan.storm_viewers} · {spec.key}",
                self.bench.storm, spec, viewers=self.plan.storm_viewers,
            )
            if result:
                self.results["storm"].setdefault(spec.key, []).append(result)

    def run_slow(self) -> None:
        if not self.plan.slow:
            return
        config = self.plan.slow
        repeats = self.plan.repeats
        for repeat in range(repeats):
            for spec in rotated(self.servers, repeat):
                pair = self.results["slow"].setdefault(spec.key, {"without": [], "with": []})
                for variant, slow in (("without", 0), ("with", 1)):
                    result = self.attempt(
                        f"slow viewer ({variant}) · {spec.key} · {repeat + 1}/{repeats}",
                        self.bench.fanout, spec, size=config["size"],
                        viewers=config["viewers"], seconds=config["seconds"],
                        warm=self.plan.warm, slow=slow,
                    )
                    if result:
                        pair[variant].append(result)

    def run_profile(self) -> None:
        spec = SERVERS["streamrelay"]
        if spec not in self.servers:
            return
        result = self.attempt(
            "py-spy profile · streamrelay · 100 KB × 300",
            environment.profile, self.bench, spec, seconds=max(self.plan.seconds, 5.0),
        )
        if result:
            self.results["profile"] = result


def summary(result: Any) -> str:
    """A one-line digest of a measurement for the progress log."""
    if not isinstance(result, dict):
        return str(result)
    keys = ("cpu_us_per_msg", "delivered_ratio", "p99_ms", "accepted_per_s",
            "refused_per_s", "cpu_us_per_handshake", "kib_per_viewer", "connected",
            "max_msgs_per_s", "all_back_s", "steady_worst_gap_ms")
    parts = []
    for key in keys:
        value = result.get(key)
        if value is not None:
            parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts) or "done"


def log(message: str) -> None:
    """Progress to stderr (the summary goes to stdout)."""
    print(message, file=sys.stderr, flush=True)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run the harness; returns the exit status."""
    args = parse_args(argv)
    if args.setup:
        return setup()
    plan = make_plan(args)
    server_core, load_core = cores()
    # The harness itself runs beside the load generators, off the server's core.
    os.sched_setaffinity(0, {load_core})
    signal.signal(signal.SIGTERM, _terminate)

    log("building the C load generators and floor")
    built = build()
    wanted = [s.strip() for s in args.servers.split(",")] if args.servers else list(SERVERS)
    unknown = [key for key in wanted if key not in SERVERS]
    if unknown:
        raise SystemExit(f"unknown servers: {', '.join(unknown)}")
    servers, skipped = [], {}
    for key in wanted:
        reason = SERVERS[key].missing()
        if reason:
            skipped[key] = reason
            log(f"!!! {SERVERS[key].label} NOT RUN: {reason}")
        else:
            servers.append(SERVERS[key])
    if args.compare_tree:
        other = other_tree(args.compare_tree)
        SERVERS[other.key] = other  # so that the report knows its label
        servers.insert(1, other)
    if "node" not in wanted and "node" not in skipped:
        reason = node_missing(install=False)
        if reason:
            skipped["node"] = reason

    facts = environment.facts(server_core, load_core)
    facts["loadavg_start"] = os.getloadavg()
    log(f"NVX masking acceleration: {facts['nvx']}")
    # Server and load-generator logs of the last few runs are kept for diagnosis.
    old_logs = sorted(BUILD.glob("bench-logs-*"), key=lambda path: path.stat().st_mtime)
    for stale in old_logs[:-4]:
        shutil.rmtree(stale, ignore_errors=True)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-logs-", dir=BUILD))
    children = Children(log_dir)
    bench = Bench(children, built, server_core, load_core)
    runner = Runner(plan, bench, servers)
    started = datetime.now(timezone.utc)
    interrupted = None
    try:
        runner.run()
    except KeyboardInterrupt as stop:
        interrupted = f"interrupted ({stop})"
        runner.errors.append(interrupted)
    finally:
        children.kill_all()
    facts["loadavg_end"] = os.getloadavg()
    facts["duration_s"] = (datetime.now(timezone.utc) - started).total_seconds()
    facts["server_logs"] = str(log_dir)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{started:%Y-%m-%d}-{socket.gethostname()}"
    context = {
        "plan": plan,
        "servers": servers,
        "skipped": skipped,
        "facts": facts,
        "command": "bench/run " + " ".join(sys.argv[1:] if argv is None else argv),
        "errors": runner.errors,
        "started": started,
    }
    markdown, ratios = report.write(args.out, stem, runner.results, context)
    (args.out / f"{stem}.json").write_text(
        json.dumps({"results": runner.results, "facts": facts, "errors": runner.errors,
                    "skipped": skipped, "mode": plan.mode, "ratios": ratios},
                   indent=1, default=str)
    )
    print(report.console_summary(runner.results, ratios, skipped, markdown))
    if platform.system() != "Linux":
        log("note: the harness is meant for Linux (epoll, /proc, taskset)")
    return 1 if interrupted else 0
