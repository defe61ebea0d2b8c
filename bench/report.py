"""The results: a Markdown table per scenario, the targets as ratios, PNG plots.

Absolute numbers drift by tens of percent on a shared machine; the ratios between
servers measured in the same run are the result, so the targets of issue 9 are checked
as ratios here (printed with a pass / miss mark, never asserted anywhere).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.servers import SERVERS

Runs = list[dict[str, Any]]
PASS, MISS = "✅ pass", "❌ miss"


def values(runs: Runs, key: str) -> list[float]:
    """The key's numeric values over the runs (None and NaN left out)."""
    found = []
    for run in runs or []:
        value = run.get(key)
        if isinstance(value, (int, float)) and value == value:
            found.append(float(value))
    return found


def median(runs: Runs, key: str) -> float | None:
    """The median of the key over the runs, or None."""
    found = values(runs, key)
    return statistics.median(found) if found else None


def number(value: float | None, digits: int = 1) -> str:
    """A figure with ``digits`` decimals, thousands separated; — for None."""
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def cell(runs: Runs, key: str, digits: int = 1) -> str:
    """``median [min–max]`` of the key over the runs (just the value for one run)."""
    found = values(runs, key)
    if not found:
        return "—"
    middle = number(statistics.median(found), digits)
    if len(found) == 1:
        return middle
    return f"{middle} [{number(min(found), digits)}–{number(max(found), digits)}]"


def label(key: str) -> str:
    """The server's display name."""
    return SERVERS[key].label if key in SERVERS else key


def ordered(table: dict[str, Any]) -> list[str]:
    """The table's servers in the canonical order."""
    order = list(SERVERS)
    return sorted(table, key=lambda key: order.index(key) if key in order else len(order))


# -- the targets ---------------------------------------------------------------------------------


def _fanout_case(results: dict[str, Any], size_kb: int, viewers: int) -> tuple[str | None, str]:
    """The fan-out case key for size × viewers, else the nearest one of that size."""
    cases = results.get("fanout", {})
    exact = f"{size_kb} KB × {viewers}"
    if exact in cases:
        return exact, ""
    same_size = [key for key in cases if key.startswith(f"{size_kb} KB × ")]
    if same_size:
        return same_size[-1], f" (measured at {same_size[-1]})"
    return None, ""


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue: measured value, target, pass/miss (None: not measured)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, target: str, ok: Callable[[float], bool],
            digits: int = 2, note: str = "") -> None:
        rows.append({
            "target": name,
            "value": value,
            "shown": number(value, digits) + note if value is not None else "not measured",
            "wanted": target,
            "pass": None if value is None else bool(ok(value)),
        })

    def cpu(case: str | None, server: str) -> float | None:
        if case is None:
            return None
        return median(results["fanout"][case].get(server, []), "cpu_us_per_msg")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    big, note = _fanout_case(results, 100, 300)
    sr = cpu(big, "streamrelay")
    add("100 KB × 300: streamrelay CPU/msg ÷ floor", ratio(sr, cpu(big, "floor")), "≤ 1.2",
        lambda v: v <= 1.2, note=note)
    add("100 KB × 300: streamrelay CPU/msg ÷ websockets", ratio(sr, cpu(big, "websockets")),
        "≤ 0.85", lambda v: v <= 0.85, note=note)
    small, note_small = _fanout_case(results, 20, 1000)
    add("20 KB × 1,000: streamrelay CPU/msg ÷ websockets",
        ratio(cpu(small, "streamrelay"), cpu(small, "websockets")), "≤ 0.85",
        lambda v: v <= 0.85, note=note_small)
    runs = results["fanout"][big].get("streamrelay", []) if big else []
    add("100 KB × 300: streamrelay p99 latency (ms)", median(runs, "p99_ms"), "≤ 20",
        lambda v: v <= 20, digits=1, note=note)
    drops = values(runs, "min_per_viewer_ratio")
    add("100 KB × 300: fast viewers' worst delivered ÷ target", min(drops) if drops else None,
        "= 1 (0 drops)", lambda v: v >= 0.999, digits=3, note=note)
    hs = results.get("handshakes", {})
    add("handshakes/s: streamrelay ÷ websockets",
        ratio(median(hs.get("streamrelay", []), "accepted_per_s"),
              median(hs.get("websockets", []), "accepted_per_s")),
        "≥ 1.2", lambda v: v >= 1.2)
    add("refused handshake CPU ÷ accepted handshake CPU", refused_ratio(results), "≤ 0.2",
        lambda v: v <= 0.2)
    slow = results.get("slow", {}).get("streamrelay", {})
    add("slow viewer: the others' p99 with it ÷ without",
        ratio(median(slow.get("with", []), "p99_ms"), median(slow.get("without", []), "p99_ms")),
        "≤ 1.1", lambda v: v <= 1.1)
    add("streamrelay RSS per idle viewer (KiB)",
        median(results.get("idle", {}).get("streamrelay", []), "kib_per_viewer"), "≤ 12",
        lambda v: v <= 12, digits=1)
    return rows


def refused_cost_us(results: dict[str, Any]) -> float | None:
    """streamrelay's CPU-µs per handshake refused by the rate limit (accepted ones in the
    same run subtracted at the accepted cost)."""
    accepted = median(results.get("handshakes", {}).get("streamrelay", []),
                      "cpu_us_per_handshake")
    costs = []
    for run in results.get("refused", []):
        if run.get("win_refused") and accepted is not None:
            spent = run["cpu_s"] * 1e6 - run["win_ok"] * accepted
            costs.append(max(spent, 0.0) / run["win_refused"])
    return statistics.median(costs) if costs else None


def refused_ratio(results: dict[str, Any]) -> float | None:
    """Refused cost ÷ accepted cost."""
    accepted = median(results.get("handshakes", {}).get("streamrelay", []),
                      "cpu_us_per_handshake")
    refused = refused_cost_us(results)
    return refused / accepted if refused is not None and accepted else None


def mark(ok: bool | None) -> str:
    """✅/❌, or — when not measured."""
    return "—" if ok is None else (PASS if ok else MISS)


# -- Markdown ------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def matrix(results: dict[str, Any], key: str = "cpu_us_per_msg", digits: int = 1) -> list[str]:
    """Fan-out cases × servers: the median of ``key`` in each cell (a Markdown table)."""
    fanout = results.get("fanout") or {}
    servers = [k for k in SERVERS if any(k in table for table in fanout.values())]
    if not servers:
        return []
    rows = [[case] + [number(median(table.get(k, []), key), digits) for k in servers]
            for case, table in fanout.items()]
    return _table(["case"] + [label(k) for k in servers], rows)


def markdown(results: dict[str, Any], context: dict[str, Any], targets: list[dict[str, Any]],
             plots: list[Path]) -> str:
    """The whole results page."""
    facts = context["facts"]
    plan = context["plan"]
    out = [
        f"# streamrelay benchmark, {context['started']:%Y-%m-%d %H:%M} UTC, {facts['host']}",
        "",
        f"`{context['command']}` — {plan.mode} mode, {facts['duration_s']:.0f} s. "
        "Medians over the repeats, [min–max] when there were several. Absolute figures "
        "drift by tens of percent on a shared machine; compare servers within this page.",
        "",
    ]
    for key, reason in context["skipped"].items():
        out += [f"> **{label(key)}: NOT RUN — {reason}**", ""]
    out += [
        "## Machine",
        "",
        f"- {facts['cpu']}, {facts['cpus']} CPUs; server pinned to core {facts['server_core']}, "
        f"load generators (C, epoll) and harness to core {facts['load_core']}",
        f"- Linux {facts['kernel']}; Python {facts['python']}; Twisted {facts['twisted']}; "
        f"Autobahn {facts['autobahn']}; websockets {facts['websockets']}; uvloop "
        f"{facts['uvloop']}; Node {facts['node']} with ws {facts['node_ws']}; {facts['gcc']}",
        f"- **Autobahn NVX masking acceleration: {facts['nvx']}**",
        f"- load average at start {tuple(round(x, 2) for x in facts['loadavg_start'])}, "
        f"at end {tuple(round(x, 2) for x in facts['loadavg_end'])}; tree {facts['git']}",
        "",
        "Servers: " + "; ".join(
            f"**{s.label}**" + (f" ({s.note})" if s.note else "") for s in context["servers"]
        ) + ".",
        "",
        "## Where streamrelay stands",
        "",
    ]
    out += _table(
        ["target (issue 9)", "measured", "wanted", ""],
        [[t["target"], t["shown"], t["wanted"], mark(t["pass"])] for t in targets],
    )
    refused = refused_cost_us(results)
    if refused is not None:
        out += [f"A handshake refused by the rate limit costs {refused:,.0f} CPU-µs.", ""]
    if results.get("fanout"):
        out += [
            "## Fan-out",
            "",
            "One publisher per stream at 30 fps (KEY every 30), C viewers reading "
            "everything. *CPU-µs/msg*: server CPU (process tree, /proc) per message "
            "delivered in the window. *delivered*: messages captured in the window that "
            "reached the viewers ÷ what the publisher sent × viewers; *worst viewer*: "
            "the same for the viewer that got the least. Latency: arrival of a message's "
            "last byte minus its capture time. *load CPU*: the load generators' CPU in the "
            "window (100% = their core is saturated and the figures are bounded by them). "
            "*core busy*: the server's core as /proc/stat saw it, everything included: "
            "well above *server CPU*, other processes of a shared machine were on it.",
            "",
            "Server CPU-µs per delivered message (medians):",
            "",
        ]
        out += matrix(results)
        out += ["p99 latency in ms (medians):", ""]
        out += matrix(results, "p99_ms")
        out += ["All figures:", ""]
        rows = []
        for case, table in results["fanout"].items():
            for key in ordered(table):
                runs = table[key]
                rows.append([
                    case, label(key), cell(runs, "cpu_us_per_msg"),
                    cell(runs, "server_cpu_pct", 0), cell(runs, "delivered_ratio", 3),
                    cell(runs, "min_per_viewer_ratio", 3), cell(runs, "p50_ms"),
                    cell(runs, "p99_ms"), cell(runs, "max_ms"), cell(runs, "rss_mib", 0),
                    cell(runs, "loadgen_cpu_pct", 0), cell(runs, "core_busy_pct", 0),
                ])
        out += _table(
            ["case", "server", "CPU-µs/msg", "server CPU %", "delivered", "worst viewer",
             "p50 ms", "p99 ms", "max ms", "RSS MiB", "load CPU %", "core busy %"],
            rows,
        )
    if results.get("saturation"):
        config = plan.saturation or {}
        out += [
            "## Saturation",
            "",
            f"{config.get('size', 0) // 1000} KB messages to {config.get('viewers')} viewers; "
            "the frame rate rises ×1.5 a step until the server falls behind (delivered < "
            "97%, p99 > 1 s, or the publisher's send queue overflowing). The maximum is "
            "the best step the server kept up with, on one core; when the load generators' "
            "core saturated first, the figure is only a lower bound.",
            "",
        ]
        rows = []
        for key in ordered(results["saturation"]):
            r = results["saturation"][key]
            last = r["points"][-1] if r["points"] else {}
            rows.append([
                label(key), number(r["max_msgs_per_s"], 0), number(r["max_gbit_per_s"], 2),
                number(r.get("at_fps"), 0), number(r.get("server_cpu_pct"), 0),
                number(r.get("core_busy_pct"), 0), number(r.get("loadgen_cpu_pct"), 0),
                "yes" if r["saturated"] else (
                    "no: the load generators' core was saturated" if r.get("load_bound")
                    else "no (steps ran out)"),
                f"{number(last.get('fps'), 0)} fps: {number(last.get('delivered_ratio'), 3)}, "
                f"p99 {number(last.get('p99_ms'))} ms, server CPU "
                f"{number(last.get('server_cpu_pct'), 0)}%, core busy "
                f"{number(last.get('core_busy_pct'), 0)}%",
            ])
        out += _table(
            ["server", "max msgs/s", "Gbit/s", "at fps", "server CPU %", "core busy %",
             "load CPU %", "fell behind", "last step"],
            rows,
        )
    if results.get("idle"):
        out += ["## Idle viewers", "",
                "Viewers of a stream nobody publishes; RSS after they connected minus before.",
                ""]
        rows = []
        for key in ordered(results["idle"]):
            runs = results["idle"][key]
            rows.append([label(key), cell(runs, "viewers", 0), cell(runs, "connected", 0),
                         cell(runs, "rss_before_mib"), cell(runs, "rss_after_mib"),
                         cell(runs, "kib_per_viewer")])
        out += _table(["server", "viewers", "connected", "RSS before MiB", "RSS after MiB",
                       "KiB per viewer"], rows)
    if results.get("handshakes"):
        out += ["## Handshakes", "",
                "50 in flight, each opened (`/watch/hs`, subprotocol offered) then closed "
                "with a close frame; the load generator ends each TCP connection once the "
                "server has closed it (or after 2 s).", ""]
        rows = []
        for key in ordered(results["handshakes"]):
            runs = results["handshakes"][key]
            rows.append([label(key), cell(runs, "accepted_per_s", 0),
                         cell(runs, "cpu_us_per_handshake", 0), cell(runs, "server_cpu_pct", 0),
                         cell(runs, "core_busy_pct", 0), cell(runs, "loadgen_cpu_pct", 0),
                         cell(runs, "errors", 0), cell(runs, "close_timeouts", 0)])
        runs = results.get("refused", [])
        if runs:
            rows.append(["streamrelay, default limits (503s)",
                         cell(runs, "accepted_per_s", 0) + " accepted, "
                         + cell(runs, "refused_per_s", 0) + " refused/s",
                         cell(runs, "cpu_us_per_handshake", 0), cell(runs, "server_cpu_pct", 0),
                         cell(runs, "core_busy_pct", 0), cell(runs, "loadgen_cpu_pct", 0),
                         cell(runs, "errors", 0), cell(runs, "close_timeouts", 0)])
        out += _table(["server", "accepted/s", "CPU-µs each", "server CPU %", "core busy %",
                       "load CPU %", "errors", "close timeouts"], rows)
    if results.get("storm"):
        out += ["## Reload storm", "",
                f"{plan.storm_viewers} viewers of a stream of 2 KB messages at 10 fps, and 10 "
                "steady ones; the crowd drops every connection "
                "(RST) and reconnects at once. *all back*: until every reconnected viewer "
                "had a media message again; *worst gap*: the steady viewers' longest pause "
                "between two messages (frame interval 100 ms).", ""]
        rows = []
        for key in ordered(results["storm"]):
            runs = results["storm"][key]
            all_back = cell(runs, "all_back_s", 2)
            if all_back == "—" and runs:
                all_back = f"not all within {number(runs[0].get('timeout_s'), 0)} s"
            rows.append([label(key), cell(runs, "viewers", 0), cell(runs, "back", 0),
                         all_back, cell(runs, "last_back_s", 2), cell(runs, "retries", 0),
                         cell(runs, "steady_worst_gap_ms", 0), cell(runs, "steady_closed", 0)])
        out += _table(["server", "viewers", "back", "all back (s)", "last back (s)",
                       "failed opens retried", "steady worst gap (ms)", "steady closed"], rows)
    if results.get("slow"):
        slow = plan.slow or {}
        out += ["## Slow-viewer isolation", "",
                f"Fan-out of {slow.get('size', 0) // 1000} KB × {slow.get('viewers')} at 30 fps "
                "with and without one extra viewer that never reads (4 KiB "
                "receive buffer). The others' p99 should stay within 10%; the server's RSS "
                "should stay bounded.", ""]
        rows = []
        for key in ordered(results["slow"]):
            pair = results["slow"][key]
            without, with_ = pair.get("without", []), pair.get("with", [])
            p0, p1 = median(without, "p99_ms"), median(with_, "p99_ms")
            rows.append([
                label(key), cell(without, "p99_ms"), cell(with_, "p99_ms"),
                number(p1 / p0, 2) if p0 and p1 else "—",
                cell(with_, "delivered_ratio", 3),
                cell(without, "rss_growth_mib", 1), cell(with_, "rss_growth_mib", 1),
            ])
        out += _table(["server", "p99 without (ms)", "p99 with (ms)", "ratio",
                       "fast viewers' delivered, with", "RSS growth without (MiB)",
                       "RSS growth with (MiB)"], rows)
    profile = results.get("profile")
    if profile:
        out += ["## Profile (py-spy, streamrelay, 100 KB × 300)", "",
                f"{profile['samples']} samples of the busy main thread (py-spy, 200 Hz, "
                "non-blocking). Inclusive share of the heaviest frames below the reactor "
                "loop (frames in ≥ 95% of the samples left out):", ""]
        out += _table(["frame", "inclusive %"],
                      [[f"`{frame}`", number(share)] for frame, share in profile["inclusive"]])
        if profile.get("streamrelay"):
            out += ["streamrelay's own frames, inclusive:", ""]
            out += _table(["frame", "inclusive %"], [[f"`{frame}`", number(share)]
                                                     for frame, share in profile["streamrelay"]])
        out += ["Self time:", ""]
        out += _table(["frame", "self %"],
                      [[f"`{frame}`", number(share)] for frame, share in profile["self"]])
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if context["errors"]:
        out += ["## Errors", ""] + [f"- {e}" for e in context["errors"]] + [""]
    out += [f"Logs of this run's processes: `{facts['server_logs']}` (the last five runs' "
            "are kept there; never committed).", ""]
    return "\n".join(out)


# -- plots ---------------------------------------------------------------------------------------


def plot(out: Path, stem: str, results: dict[str, Any]) -> list[Path]:
    """PNG plots of what was measured; [] (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    palette = ["#d62728", "#9467bd", "#1f77b4", "#17becf", "#2ca02c", "#7f7f7f"]
    # Servers outside SERVERS (streamrelay from --compare-tree) share one colour of their own.
    colours = dict(zip(SERVERS, palette, strict=False))
    other = "#bcbd22"
    written = []
    fanout = results.get("fanout") or {}
    if fanout:
        cases = list(fanout)
        servers = [k for k in SERVERS if any(k in fanout[c] for c in cases)]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=80)
        width = 0.8 / max(1, len(servers))
        for metric, axis, title in (
            ("cpu_us_per_msg", axes[0], "server CPU-µs per delivered message"),
            ("p99_ms", axes[1], "p99 latency (ms)"),
        ):
            for i, key in enumerate(servers):
                mids, lows, highs = [], [], []
                for c in cases:
                    found = values(fanout[c].get(key, []), metric)
                    m = statistics.median(found) if found else 0.0
                    mids.append(m)
                    lows.append(m - min(found) if found else 0.0)
                    highs.append(max(found) - m if found else 0.0)
                xs = [x + i * width for x in range(len(cases))]
                axis.bar(xs, mids, width, yerr=[lows, highs], label=label(key),
                         color=colours.get(key, other))
            axis.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(cases))])
            axis.set_xticklabels(cases, rotation=20, fontsize=8)
            axis.set_title(title, fontsize=10)
            if metric == "p99_ms":
                axis.set_yscale("log")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{stem}-fanout.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    saturation = results.get("saturation") or {}
    if saturation:
        fig, axis = plt.subplots(figsize=(6.5, 4), dpi=80)
        for key in ordered(saturation):
            points = saturation[key]["points"]
            axis.plot([p["target_per_s"] for p in points],
                      [p["delivered_per_s"] for p in points], marker="o", label=label(key),
                      color=colours.get(key, other))
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("target messages/s")
        axis.set_ylabel("delivered messages/s (one core)")
        axis.set_title("Saturation, 20 KB messages", fontsize=10)
        axis.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{stem}-saturation.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    panels = [(name, metric, title) for name, metric, title in (
        ("handshakes", "accepted_per_s", "handshakes accepted per second"),
        ("idle", "kib_per_viewer", "RSS per idle viewer (KiB)"),
    ) if results.get(name)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), dpi=80)
        axes = axes if len(panels) > 1 else [axes]
        for axis, (name, metric, title) in zip(axes, panels, strict=True):
            keys = ordered(results[name])
            mids = [median(results[name][k], metric) or 0.0 for k in keys]
            axis.bar(range(len(keys)), mids, color=[colours.get(k, other) for k in keys])
            axis.set_xticks(range(len(keys)))
            axis.set_xticklabels([label(k) for k in keys], rotation=25, fontsize=7)
            axis.set_title(title, fontsize=10)
        fig.tight_layout()
        path = out / f"{stem}-handshakes-idle.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def write(out: Path, stem: str, results: dict[str, Any],
          context: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
    """Write the plots and ``<stem>.md``; returns its path and the target rows."""
    plots = plot(out, stem, results)
    if not plots:
        context["errors"].append("plots skipped: matplotlib is not installed (bench/run --setup)")
    targets = ratios(results)
    path = out / f"{stem}.md"
    path.write_text(markdown(results, context, targets, plots))
    return path, targets


def console_summary(results: dict[str, Any], targets: list[dict[str, Any]],
                    skipped: dict[str, str], path: Path) -> str:
    """What the run prints at the end."""
    lines = ["", "== streamrelay benchmark summary =="]
    for key, reason in skipped.items():
        lines.append(f"!! {label(key)} NOT RUN: {reason}")
    for case, table in (results.get("fanout") or {}).items():
        lines.append(f"fan-out {case}: CPU-µs/msg " + ", ".join(
            f"{label(k)} {number(median(table[k], 'cpu_us_per_msg'))}" for k in ordered(table)))
    if results.get("handshakes"):
        lines.append("handshakes/s: " + ", ".join(
            f"{label(k)} {number(median(results['handshakes'][k], 'accepted_per_s'), 0)}"
            for k in ordered(results["handshakes"])))
    if results.get("idle"):
        lines.append("KiB per idle viewer: " + ", ".join(
            f"{label(k)} {number(median(results['idle'][k], 'kib_per_viewer'))}"
            for k in ordered(results["idle"])))
    lines.append("targets:")
    for t in targets:
        lines.append(f"  {mark(t['pass']):8} {t['target']}: {t['shown']} (want {t['wanted']})")
    lines.append(f"results: {path}")
    return "\n".join(lines)
