"""The scenarios: one measurement each, against one server started fresh for it.

A measurement starts the server pinned to the server core, the C load generators pinned
to the other, and measures inside a window set on the wall clock: the viewers count the
messages whose capture time falls in it (delivered / target) and those that arrive in
it (CPU per delivered message), and the harness reads the server's CPU time at both ends.
Every wait here has a deadline; the server is stopped when the measurement ends.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Child, Children, busy_pct, core_ticks, free_port, wait_for_port
from bench.servers import REPO, Server

Metrics = dict[str, Any]


def now_us() -> int:
    """CLOCK_REALTIME in microseconds: the clock of capture times."""
    return time.time_ns() // 1000


def sleep_until_us(deadline_us: int) -> None:
    """Sleep until the wall clock reaches ``deadline_us`` (bounded by the gap)."""
    left = (deadline_us - now_us()) / 1e6
    if left > 0:
        time.sleep(left)


@dataclass
class Bench:
    """What every measurement needs: the children registry, binaries and cores."""

    children: Children
    built: dict[str, Path]
    server_core: int
    load_core: int
    connect_timeout: float = 60.0

    # -- processes ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def server(self, spec: Server, tag: str) -> Iterator[tuple[Child, int]]:
        """Start ``spec`` on a free port, wait until it listens, stop it afterwards."""
        port = free_port()
        env = dict(os.environ)
        env.update(spec.env)
        child = self.children.start(
            f"{tag}-{spec.key}",
            spec.command(port, self.built),
            self.server_core,
            env=env,
            cwd=spec.cwd or REPO,
        )
        try:
            wait_for_port(port, child, timeout=30.0)
            yield child, port
        finally:
            self.children.stop(child)

    def viewers(
        self, port: int, tag: str, count: int, *, streams: int = 1, name: str = "bench",
        inflight: int = 64, slow: int = 0,
    ) -> Child:
        """Start the C viewers (driven through stdin)."""
        argv = [
            str(self.built["viewers"]), "--port", str(port), "--count", str(count),
            "--streams", str(streams), "--name", name, "--inflight", str(inflight),
            "--slow", str(slow), "--max-seconds", "900",
        ]
        return self.children.start(tag, argv, self.load_core, events=True, stdin=True)

    def publisher(
        self, port: int, tag: str, *, size: int, fps: float, streams: int, seconds: float,
        window: tuple[int, int], gop: int = 30, name: str = "bench",
    ) -> Child:
        """Start the C publisher for ``seconds``."""
        argv = [
            str(self.built["publisher"]), "--port", str(port), "--size", str(size),
            "--fps", str(fps), "--streams", str(streams), "--seconds", f"{seconds:.3f}",
            "--gop", str(gop), "--name", name,
            "--window-start", str(window[0]), "--window-end", str(window[1]),
        ]
        return self.children.start(tag, argv, self.load_core, events=True)

    # -- scenarios ---------------------------------------------------------------------------

    def fanout(
        self, spec: Server, *, size: int, viewers: int, streams: int = 1, fps: float = 30,
        seconds: float = 4.0, warm: float = 1.0, slow: int = 0,
    ) -> Metrics:
        """One publisher per stream, ``viewers`` fast viewers in all (plus ``slow`` that
        stop reading); CPU per delivered message, delivered / target, latency, RSS."""
        per_stream = viewers // streams
        with self.server(spec, "fanout") as (server, port):
            rss_idle = server.rss()
            view = self.viewers(port, "fanout-viewers", per_stream * streams, streams=streams)
            ready = view.event("ready", self.connect_timeout)
            laggards = None
            if slow:
                laggards = self.viewers(port, "fanout-slow", slow, slow=slow)
                laggards.event("ready", self.connect_timeout)
            time.sleep(0.2)
            t0 = now_us() + int(warm * 1e6)
            t1 = t0 + int(seconds * 1e6)
            view.send(f"window {t0} {t1}")
            publisher = self.publisher(
                port, "fanout-publisher", size=size, fps=fps, streams=streams,
                seconds=(t1 - now_us()) / 1e6 + 0.5, window=(t0, t1),
            )
            sleep_until_us(t0)
            cpu0, load0 = server.cpu(), view.cpu() + publisher.cpu()
            core0 = core_ticks(self.server_core)
            rss_peak = 0
            while now_us() < t1:
                rss_peak = max(rss_peak, server.rss())
                time.sleep(min(0.5, max(0.0, (t1 - now_us()) / 1e6)))
            cpu1, load1 = server.cpu(), view.cpu() + publisher.cpu()
            core1 = core_ticks(self.server_core)
            rss_end = server.rss()
            rss_peak = max(rss_peak, rss_end)
            published = publisher.event("final", seconds + 30)
            time.sleep(0.3)
            received = view.request("stop", "final", 30)
            if laggards:
                laggards.send("stop")
        target = published.get("win_sent", 0) * per_stream
        arrived = received["win_arrival_msgs"]
        cpu = cpu1 - cpu0
        return {
            "connected": ready["upgraded"],
            "viewers": per_stream * streams,
            "cpu_us_per_msg": cpu * 1e6 / arrived if arrived else None,
            "server_cpu_pct": 100 * cpu / seconds,
            "loadgen_cpu_pct": 100 * (load1 - load0) / seconds,
            "core_busy_pct": busy_pct(core0, core1),
            "delivered_ratio": received["win_capture_msgs"] / target if target else None,
            "min_per_viewer_ratio": (
                received["win_capture_min"] / (published["win_sent"] / streams)
                if published.get("win_sent") else None
            ),
            "delivered_per_s": arrived / seconds,
            "p50_ms": received["lat_p50_us"] / 1000,
            "p99_ms": received["lat_p99_us"] / 1000,
            "max_ms": received["lat_max_us"] / 1000,
            "rss_mib": rss_end / 2**20,
            "rss_peak_mib": rss_peak / 2**20,
            "rss_growth_mib": (rss_peak - rss_idle) / 2**20,
            "publisher_skipped": published.get("skipped", 0),
            "closed_by_server": received["closed_by_server"],
        }

    def saturation(
        self, spec: Server, *, size: int, viewers: int, steps: list[float], seconds: float,
    ) -> Metrics:
        """Raise the frame rate step by step until the server falls behind (delivered below
        97% of the target within 0.6 s of the window's end, p99 above 1 s, or the
        publisher's queue overflowing), or until the load generators' own core is
        saturated (then the figure is a lower bound).  Latency alone is a poor signal on
        a shared machine: one 300 ms stall of either core puts p99 above 250 ms."""
        points = []
        with self.server(spec, "saturation") as (server, port):
            view = self.viewers(port, "saturation-viewers", viewers)
            view.event("ready", self.connect_timeout)
            for fps in steps:
                t0 = now_us() + 500_000
                t1 = t0 + int(seconds * 1e6)
                view.send(f"window {t0} {t1}")
                publisher = self.publisher(
                    port, "saturation-publisher", size=size, fps=fps, streams=1,
                    seconds=(t1 - now_us()) / 1e6 + 0.3, window=(t0, t1), gop=max(1, int(fps)),
                )
                sleep_until_us(t0)
                cpu0, load0 = server.cpu(), view.cpu() + publisher.cpu()
                core0 = core_ticks(self.server_core)
                sleep_until_us(t1)
                cpu1, load1 = server.cpu(), view.cpu() + publisher.cpu()
                core1 = core_ticks(self.server_core)
                published = publisher.event("final", seconds + 30)
                time.sleep(0.3)
                received = view.request("report", "report", 30)
                target = published.get("win_sent", 0) * viewers
                ratio = received["win_capture_msgs"] / target if target else 0.0
                point = {
                    "fps": fps,
                    "target_per_s": fps * viewers,
                    "delivered_per_s": received["win_arrival_msgs"] / seconds,
                    "delivered_ratio": ratio,
                    "p99_ms": received["lat_p99_us"] / 1000,
                    "server_cpu_pct": 100 * (cpu1 - cpu0) / seconds,
                    "loadgen_cpu_pct": 100 * (load1 - load0) / seconds,
                    "core_busy_pct": busy_pct(core0, core1),
                    "skipped": published.get("skipped", 0),
                }
                point["kept_up"] = (
                    ratio >= 0.97 and point["p99_ms"] <= 1000 and not point["skipped"]
                )
                point["load_bound"] = point["loadgen_cpu_pct"] >= 90
                points.append(point)
                if not point["kept_up"] or point["load_bound"]:
                    break
                time.sleep(0.7)
            view.send("stop")
        kept = [p for p in points if p["kept_up"]]
        best = max(kept, key=lambda p: p["delivered_per_s"]) if kept else None
        return {
            "points": points,
            "max_msgs_per_s": best["delivered_per_s"] if best else 0.0,
            "max_gbit_per_s": best["delivered_per_s"] * size * 8 / 1e9 if best else 0.0,
            "at_fps": best["fps"] if best else None,
            "server_cpu_pct": best["server_cpu_pct"] if best else None,
            "loadgen_cpu_pct": best["loadgen_cpu_pct"] if best else None,
            "core_busy_pct": best["core_busy_pct"] if best else None,
            "saturated": bool(points) and not points[-1]["kept_up"],
            "load_bound": bool(points) and points[-1]["load_bound"],
        }

    def idle(self, spec: Server, *, viewers: int) -> Metrics:
        """RSS per connected idle viewer (viewers of a stream nobody publishes)."""
        with self.server(spec, "idle") as (server, port):
            time.sleep(0.5)
            before = server.rss()
            view = self.viewers(port, "idle-viewers", viewers, name="idle", inflight=100)
            ready = view.event("ready", self.connect_timeout + viewers / 100)
            time.sleep(1.5)
            after = server.rss()
            report = view.request("report", "report", 30)
            view.send("stop")
        connected = report["upgraded"]
        return {
            "viewers": viewers,
            "connected": connected,
            "failed": ready["failed"],
            "rss_before_mib": before / 2**20,
            "rss_after_mib": after / 2**20,
            "kib_per_viewer": (after - before) / 1024 / connected if connected else None,
        }

    def handshakes(self, spec: Server, *, seconds: float, inflight: int = 50) -> Metrics:
        """Open-then-close handshakes with ``inflight`` in flight: accepted per second on
        one core and server CPU per handshake (accepted or refused)."""
        with self.server(spec, "handshakes") as (server, port):
            t0 = now_us() + 500_000
            t1 = t0 + int(seconds * 1e6)
            argv = [
                str(self.built["handshakes"]), "--port", str(port), "--path", "/watch/hs",
                "--inflight", str(inflight), "--seconds", f"{seconds + 0.7:.3f}",
                "--window-start", str(t0), "--window-end", str(t1),
            ]
            load = self.children.start("handshakes", argv, self.load_core, events=True)
            sleep_until_us(t0)
            cpu0, load0 = server.cpu(), load.cpu()
            core0 = core_ticks(self.server_core)
            sleep_until_us(t1)
            cpu1, load1 = server.cpu(), load.cpu()
            core1 = core_ticks(self.server_core)
            result = load.event("final", seconds + 30)
        done = result["win_ok"] + result["win_refused"]
        cpu = cpu1 - cpu0
        return {
            "accepted_per_s": result["win_ok"] / seconds,
            "refused_per_s": result["win_refused"] / seconds,
            "errors": result["errors"],
            "close_timeouts": result["close_timeouts"],
            "cpu_us_per_handshake": cpu * 1e6 / done if done else None,
            "server_cpu_pct": 100 * cpu / seconds,
            "loadgen_cpu_pct": 100 * (load1 - load0) / seconds,
            "core_busy_pct": busy_pct(core0, core1),
            "win_ok": result["win_ok"],
            "win_refused": result["win_refused"],
            "cpu_s": cpu,
        }

    def storm(
        self, spec: Server, *, viewers: int, steady: int = 10, size: int = 2000,
        fps: float = 10, timeout: float = 30.0,
    ) -> Metrics:
        """``viewers`` reconnect at once while a stream plays: time until every one has a
        media message again, and the steady viewers' worst gap between messages."""
        with self.server(spec, "storm") as (server, port):
            steady_view = self.viewers(port, "storm-steady", steady)
            steady_view.event("ready", self.connect_timeout)
            # The first connections go 200 at a time; the reconnect goes all at once.
            crowd = self.viewers(port, "storm-crowd", viewers, inflight=200)
            crowd_ready = crowd.event("ready", self.connect_timeout + viewers / 100)
            start = now_us()
            publisher = self.publisher(
                port, "storm-publisher", size=size, fps=fps, streams=1,
                seconds=timeout + 10, window=(start, start + int((timeout + 10) * 1e6)),
                gop=int(fps),
            )
            time.sleep(1.5)
            t0 = now_us()
            steady_view.send(f"window {t0} {t0 + int((timeout + 10) * 1e6)}")
            crowd.send("reconnect")
            deadline = time.monotonic() + timeout
            report = crowd.request("report", "report", 30)
            while report["back"] < viewers and time.monotonic() < deadline:
                time.sleep(0.25)
                report = crowd.request("report", "report", 30)
            time.sleep(0.5)
            steady_report = steady_view.request("report", "report", 30)
            cpu = server.cpu()
            crowd.send("stop")
            steady_view.send("stop")
            publisher.stop(grace=0.5)
        return {
            "viewers": viewers,
            "initially_connected": crowd_ready["upgraded"],
            "back": report["back"],
            "all_back_s": report["back_max_us"] / 1e6 if report["back"] >= viewers else None,
            "timeout_s": timeout,
            "last_back_s": report["back_max_us"] / 1e6,
            "retries": report["retries"],
            "gave_up": report["failed"],
            "steady_worst_gap_ms": steady_report["max_gap_us"] / 1000,
            "frame_interval_ms": 1000 / fps,
            "steady_closed": steady_report["closed_by_server"],
            "server_cpu_s": cpu,
        }
