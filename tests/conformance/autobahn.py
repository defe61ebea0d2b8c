"""Run the Autobahn|Testsuite (``wstest -m fuzzingclient``) against streamrelay's ``/echo``.

The relay is launched as users launch it::

    twistd -n --pidfile= streamrelay --echo --listen tcp:0:interface=127.0.0.1 \\
        --max-message-bytes 16777216 --max-fragments-per-message 65537 \\
        --max-handshakes-per-ip 1000

Every other limit and timer keeps its production default.  The three raised limits, and
why (also in docs/robustness.md):

- ``--max-message-bytes 16777216``: cases 9.1.6 and 9.2.6 echo a 16 MiB message; the
  production bound (8 MiB) would close them with 1009 instead of echoing.
- ``--max-fragments-per-message 65537``: cases 9.3.1 and 9.4.1 send 4 MiB in 64-byte
  fragments, and wstest ends the message with an empty final fragment: 65,537 frames in
  one message.  The production cap is 4,096.
- ``--max-handshakes-per-ip 1000``: the suite opens one connection per case from one
  address, back to back: in categories 6 and 7 well over 100 a second (peak measured:
  130 in one second).  The production rate limit (50 a second, burst 100) rightly answers
  the excess with 503, as it would a reload storm: 3 to 47 handshakes per run were
  refused here, failing those cases.

The per-address connection cap (100) needs no change: the suite runs the cases one after
another and waits for each connection to close.

Results land in ``$STREAMRELAY_ARTIFACTS/conformance/`` (default ``artifacts/conformance/``
in the repository): ``index.html`` and ``index.json`` (wstest's report, one page per
case), ``tally.json`` (count per behaviour, failing cases, durations), ``spec.json``,
``wstest.log`` and ``relay.log``.  The run passes when every case's ``behavior`` is OK,
NON-STRICT or INFORMATIONAL and every ``behaviorClose`` is OK or INFORMATIONAL, the report
lists all 517 cases (for the full run) and the relay logged no traceback.

Usage::

    scripts/run-conformance                    # all 517 cases (categories 1-13)
    scripts/run-conformance --cases '1.*,9.*'  # a quick subset
    scripts/run-conformance --reactor poll     # under another reactor
    scripts/run-conformance --docker           # wstest from the crossbario/autobahn-testsuite image

wstest is found from ``--wstest``, env ``WSTEST``, ``PATH``, ``$WSTEST_PREFIX/bin/wstest``
or ``/opt/wstest/bin/wstest``.  Exit status: 0 pass, 1 fail, 2 wstest or twistd missing.

``scripts/run-conformance`` runs :func:`main`; ``tests/conformance/test_autobahn.py`` runs
the same steps with the same arguments, so the test runs exactly what a user runs. The
relay is launched by :class:`tests.support.relay_process.RelayProcess`, as in every other
suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.support.relay_process import RelayProcess, log_problems

ROOT = Path(__file__).resolve().parents[2]
SPEC_TEMPLATE = Path(__file__).resolve().with_name("fuzzingclient.json")
AGENT = "streamrelay"
DOCKER_IMAGE = "crossbario/autobahn-testsuite"

# Only the limits the suite needs raised; see the module docstring for why.
RELAY_ARGUMENTS = (
    "--echo",
    "--max-message-bytes", str(16 * 1024 * 1024),
    "--max-fragments-per-message", "65537",
    "--max-handshakes-per-ip", "1000",
)

# All cases of categories 1-13 in autobahntestsuite 25.10.1, the version the install
# script pins.  (The crossbario/autobahn-testsuite image is expected to list the same
# cases; not verified here.)
EXPECTED_CASES = 517
GOOD_BEHAVIOR = frozenset({"OK", "NON-STRICT", "INFORMATIONAL"})
GOOD_CLOSE = frozenset({"OK", "INFORMATIONAL"})

_DAY_MS = 24 * 3600 * 1000


# -- where things are --------------------------------------------------------------------


def artifacts_dir(base: Path | None = None) -> Path:
    """``BASE/conformance``; BASE defaults to ``$STREAMRELAY_ARTIFACTS`` or
    ``<repo>/artifacts``."""
    base = base or Path(os.environ.get("STREAMRELAY_ARTIFACTS") or ROOT / "artifacts")
    return base.resolve() / "conformance"


def prepare_outdir(outdir: Path | None = None) -> Path:
    """An empty report folder (always a ``conformance`` folder): stale case pages from an
    earlier run would mislead."""
    outdir = outdir or artifacts_dir()
    if outdir.name != "conformance":
        raise ValueError(f"refusing to empty {outdir}: not a conformance report folder")
    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    return outdir


def find_wstest(explicit: str | None = None) -> list[str] | None:
    """The command that runs wstest, or None when it is not installed (or when an
    explicit path does not name an executable)."""
    if explicit:
        return [explicit] if os.access(explicit, os.X_OK) and Path(explicit).is_file() else None
    candidates = [os.environ.get("WSTEST"), shutil.which("wstest")]
    prefix = os.environ.get("WSTEST_PREFIX")
    if prefix:
        candidates.append(str(Path(prefix) / "bin" / "wstest"))
    candidates.append("/opt/wstest/bin/wstest")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return [candidate]
    return None


def docker_wstest(outdir: Path) -> list[str] | None:
    """wstest from the Docker image, with the report folder mounted at the same path."""
    docker = shutil.which("docker")
    if docker is None:
        return None
    return [
        docker, "run", "--rm", "--network", "host",
        "--user", f"{os.getuid()}:{os.getgid()}",
        "--volume", f"{outdir}:{outdir}", "--workdir", str(outdir),
        DOCKER_IMAGE, "wstest",
    ]


def find_twistd() -> str | None:
    """twistd of the environment streamrelay is installed in."""
    candidates = [
        os.environ.get("STREAMRELAY_TWISTD"),
        str(Path(sys.executable).with_name("twistd")),
        str(ROOT / ".venv" / "bin" / "twistd"),
        shutil.which("twistd"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return candidate
    return None


def wstest_environment() -> dict[str, str]:
    """wstest runs on its own Python 2.7: keep this interpreter's settings away from it."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH"):
        env.pop(name, None)
    return env


def wstest_version(wstest: list[str]) -> str:
    """``Autobahn x / AutobahnTestSuite y``, as wstest reports it."""
    try:
        output = subprocess.run(
            [*wstest, "--autobahnversion"], capture_output=True, text=True, timeout=120,
            env=wstest_environment(), cwd="/",
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return " / ".join(line.strip() for line in output.splitlines() if line.strip()) or "unknown"


# -- one run -----------------------------------------------------------------------------


def write_spec(outdir: Path, url: str, cases: list[str]) -> Path:
    """Fill the spec template for ``url`` and write it into the report folder."""
    template = json.loads(SPEC_TEMPLATE.read_text("utf-8"))
    spec = {key: value for key, value in template.items() if not key.startswith("_")}
    spec["outdir"] = str(outdir)
    spec["servers"] = [dict(server, url=url) for server in spec["servers"]]
    spec["cases"] = cases
    path = outdir / "spec.json"
    path.write_text(json.dumps(spec, indent=2) + "\n", "utf-8")
    return path


@dataclass
class WstestRun:
    """How a wstest run ended."""

    returncode: int
    seconds: float
    log_path: Path


def run_wstest(wstest: list[str], spec: Path, outdir: Path, timeout: float) -> WstestRun:
    """Run the fuzzing client; its console output goes to ``wstest.log``.

    wstest runs from the report folder: run from the repository, Python 2.7 would put the
    repository (with its ``twisted/plugins`` folder) first on ``sys.path``."""
    log_path = outdir / "wstest.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [*wstest, "-m", "fuzzingclient", "-s", str(spec)],
            cwd=str(outdir), env=wstest_environment(),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            returncode = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = -9
            log.write(f"\n*** wstest killed after {timeout:.0f} s\n".encode())
    return WstestRun(returncode, time.monotonic() - started, log_path)


def case_key(case: str) -> tuple[int, ...]:
    """Sort ``9.10.2`` after ``9.2.1``."""
    return tuple(int(part) if part.isdigit() else 0 for part in case.split("."))


def load_results(outdir: Path) -> dict[str, dict]:
    """Case id -> wstest's summary entry (``behavior``, ``behaviorClose``, ``duration``...)."""
    index = outdir / "index.json"
    if not index.exists():
        return {}
    data = json.loads(index.read_text("utf-8"))
    return dict(sorted(data.get(AGENT, {}).items(), key=lambda item: case_key(item[0])))


def case_detail(outdir: Path, entry: dict) -> dict:
    """wstest's own words for one case: description, expectation, result."""
    report = outdir / entry.get("reportfile", "")
    if not entry.get("reportfile") or not report.exists():
        return {}
    data = json.loads(report.read_text("utf-8"))
    return {
        key: data.get(key)
        for key in ("description", "expectation", "result", "resultClose",
                    "remoteCloseCode", "remoteCloseReason", "localCloseCode",
                    "wasClean", "wasNotCleanReason", "droppedByMe")
    }


def tally(results: dict[str, dict], outdir: Path) -> dict:
    """Counts per behaviour and per close behaviour, failing cases, time per category."""
    failures = []
    for case, entry in results.items():
        behavior, close = entry.get("behavior"), entry.get("behaviorClose")
        if behavior not in GOOD_BEHAVIOR or close not in GOOD_CLOSE:
            failures.append({
                "case": case,
                "behavior": behavior,
                "behaviorClose": close,
                **case_detail(outdir, entry),
            })
    seconds: dict[str, float] = {}
    for case, entry in results.items():
        category = case.split(".")[0]
        duration = entry.get("duration") or 0
        # wstest reports an epoch-sized duration for a case whose handshake failed.
        if 0 <= duration < _DAY_MS:
            seconds[category] = seconds.get(category, 0.0) + duration / 1000.0
    return {
        "cases": len(results),
        "behavior": dict(
            Counter(entry.get("behavior") for entry in results.values()).most_common()
        ),
        "behaviorClose": dict(
            Counter(entry.get("behaviorClose") for entry in results.values()).most_common()
        ),
        "failures": failures,
        "seconds_per_category": {
            category: round(seconds[category], 1)
            for category in sorted(seconds, key=lambda name: int(name) if name.isdigit() else 0)
        },
    }


def verdict(tally_: dict, cases: list[str], log_errors: list[str], returncode: int) -> list[str]:
    """Everything wrong with a run; empty when it passes."""
    problems = []
    if returncode != 0:
        problems.append(f"wstest exited with status {returncode} (see wstest.log)")
    if cases == ["*"] and tally_["cases"] != EXPECTED_CASES:
        problems.append(f"the report lists {tally_['cases']} cases, expected {EXPECTED_CASES}")
    if tally_["cases"] == 0:
        problems.append("the report lists no case at all")
    for failure in tally_["failures"]:
        problems.append(
            f"case {failure['case']}: behavior {failure['behavior']}, "
            f"behaviorClose {failure['behaviorClose']}\n"
            f"    description: {failure.get('description')}\n"
            f"    expectation: {failure.get('expectation')}\n"
            f"    result:      {failure.get('result')}\n"
            f"    resultClose: {failure.get('resultClose')}\n"
            f"    relay closed with {failure.get('remoteCloseCode')} "
            f"{failure.get('remoteCloseReason')!r}; not clean because: "
            f"{failure.get('wasNotCleanReason')}"
        )
    if log_errors:
        problems.append("the relay logged errors:\n    " + "\n    ".join(log_errors[:20]))
    return problems


def format_tally(tally_: dict) -> str:
    """A few human lines for the console."""
    lines = [f"Autobahn testsuite: {tally_['cases']} cases"]
    lines.append("  behavior:      " + ", ".join(f"{k} {v}" for k, v in tally_["behavior"].items()))
    lines.append(
        "  behaviorClose: " + ", ".join(f"{k} {v}" for k, v in tally_["behaviorClose"].items())
    )
    if "wall_seconds" in tally_:
        lines.append(f"  wall time:     {tally_['wall_seconds']:.0f} s")
    lines.append(
        "  case time per category (s): "
        + ", ".join(f"{k}: {v:g}" for k, v in tally_["seconds_per_category"].items())
    )
    lines.append(f"  failing cases: {len(tally_['failures'])}")
    return "\n".join(lines)


def write_tally(outdir: Path, tally_: dict) -> Path:
    """``tally.json`` next to wstest's report."""
    path = outdir / "tally.json"
    path.write_text(json.dumps(tally_, indent=2) + "\n", "utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """``scripts/run-conformance``: run the suite, write the report, return the exit status."""
    parser = argparse.ArgumentParser(
        description="Run the Autobahn testsuite against streamrelay's /echo.",
        epilog="Report: $STREAMRELAY_ARTIFACTS/conformance (default artifacts/conformance).",
    )
    parser.add_argument("--cases", default="*",
                        help="comma list of case patterns, e.g. '1.*,9.*' (default: all)")
    parser.add_argument("--reactor", default=os.environ.get("STREAMRELAY_TEST_REACTOR") or None,
                        help="twistd reactor (epoll, poll, select, asyncio; default twistd's)")
    parser.add_argument("--url", help="test a relay that is already running at this ws:// URL "
                        "(it must have been started with the arguments above)")
    parser.add_argument("--wstest", help="path of wstest")
    parser.add_argument("--docker", action="store_true",
                        help=f"run wstest from the {DOCKER_IMAGE} image (docker, host network)")
    parser.add_argument("--artifacts", type=Path,
                        help="artifacts folder; the report goes to its conformance/ "
                        "(default: $STREAMRELAY_ARTIFACTS or artifacts/)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds before wstest is killed (3600)")
    options = parser.parse_args(argv)
    cases = [case.strip() for case in options.cases.split(",") if case.strip()]

    outdir = prepare_outdir(artifacts_dir(options.artifacts))
    wstest = docker_wstest(outdir) if options.docker else find_wstest(options.wstest)
    if wstest is None:
        print("wstest not found: install it with scripts/install-wstest PREFIX "
              "(then set WSTEST or WSTEST_PREFIX), or use --docker", file=sys.stderr)
        return 2

    relay = None
    if options.url:
        url = options.url
    else:
        twistd = find_twistd()
        if twistd is None:
            print("twistd not found: install streamrelay (pip install .) first", file=sys.stderr)
            return 2
        relay = RelayProcess(
            outdir / "relay.log", RELAY_ARGUMENTS, reactor=options.reactor, twistd=twistd
        )
        url = relay.ws_url + "/echo"
        print("relay: " + " ".join(relay.command))
    print(f"wstest: {' '.join(wstest)} against {url}, cases {','.join(cases)}")
    spec = write_spec(outdir, url, cases)
    try:
        run = run_wstest(wstest, spec, outdir, options.timeout)
    finally:
        status = relay.stop() if relay is not None else None
    results = load_results(outdir)
    summary = tally(results, outdir)
    summary.update({
        "wall_seconds": round(run.seconds, 1),
        "wstest": wstest_version(wstest),
        "relay_arguments": list(RELAY_ARGUMENTS),
        "reactor": options.reactor or "default",
        "relay_exit_status": status,
    })
    write_tally(outdir, summary)
    print(format_tally(summary))
    errors = log_problems(relay.log_text()) if relay is not None else []
    problems = verdict(summary, cases, errors, run.returncode)
    print(f"report: {outdir / 'index.html'}")
    if problems:
        print("FAILED:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    print("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
