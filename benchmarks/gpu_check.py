"""One command for the GPU machine: the GPU tests, compute-sanitizer, and the benchmarks, summarised in
benchmarks/results/gpu-check.json. Exits non-zero when anything failed.

    python3 benchmarks/gpu_check.py                      all three stages, the quick benchmarks (~9 min cap)
    python3 benchmarks/gpu_check.py --stage tests        one stage (repeat --stage for several)
    python3 benchmarks/gpu_check.py --stage bench --full the whole benchmark suite (~6 min on an H100)

Stages, each a subprocess with its own time limit, all inside --budget seconds:
  tests      ``pytest -m gpu tests`` with a junit report, counted (passed / failed / errors / skipped);
  sanitizer  compute-sanitizer's memcheck, racecheck, initcheck and synccheck over a few GPU tests (conv,
             pooling, dense, loss, optimizers, a short fit), with CuPy's memory pools off (GPUCNN_NO_POOL=1,
             tests/conftest.py), counting the errors of each tool's summary line;
  bench      ``pytest benchmarks --benchmark-only`` (GPUCNN_BENCH_QUICK=1 unless --full), then
             summarize.py (latest.json, summary.md, scaling.png).

Runs from the repository root with plain ``python3`` (no install, no venv: the repository goes on
PYTHONPATH). Where $GPUCNN_HOME is unset and .data/datasets/mnist.npz exists, GPUCNN_HOME=.data.
Logs go to benchmarks/results/logs/. Without a usable GPU the GPU tests are skipped and counted as
such, and the sanitizer stage is skipped; that is a failure only with --require-gpu.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
LOGS = RESULTS / "logs"
sys.path[:0] = [str(ROOT), str(HERE)]

from bench_utils import commit, gpu_info  # noqa: E402

STAGES = ("tests", "sanitizer", "bench")
TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
DEFAULT_TIMEOUTS = {"tests": 130, "sanitizer": 170, "bench": 240, "bench_full": 420}  # sum <= --budget
# The sanitizer's selection: a few cases of each op family, a CUDA-graph step, a short fit (fast path).
SANITIZER_FILES = ("tests/test_gpu.py", "tests/test_fastpath.py", "benchmarks/gpu_smoke.py")
SANITIZER_TESTS = (
    "test_conv2d_matches_reference and (n2-c3-7x5-k3-s2-same or n7-c8-28x28-k3-s1-valid)",
    "test_conv2d_tile_edges",
    "test_maxpool2d_exact and (11x11-p3-s2-same or 7x5-p2-s1-valid)",
    "test_avgpool2d_exact and 7x5-p3-s2-same",
    "test_second_backward_call_gives_the_same_result",
    "test_dense_matches_reference and (65-33-70 or 7-576-64) and relu",
    "test_crossentropy_matches_reference and 64-10",
    "test_sgd_update_matches_reference and 0.9-True",
    "test_rmsprop_update_matches_reference",
    "test_adam_update_matches_reference",
    "test_dropout_mask and 0.5",
    "test_a_step_can_be_captured_in_a_cuda_graph",
    "test_the_fast_path_is_used_and_has_a_last_batch_graph",
    "test_short_fit_and_evaluate_on_the_gpu",
)
SANITIZER_EXPR = " or ".join(f"({t})" for t in SANITIZER_TESTS)


def _rel(path):
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ===================================================================================== running
def environment(quick):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if not env.get("GPUCNN_HOME") and (ROOT / ".data" / "datasets" / "mnist.npz").is_file():
        env["GPUCNN_HOME"] = str(ROOT / ".data")
    if quick:
        env["GPUCNN_BENCH_QUICK"] = "1"
    else:
        env.pop("GPUCNN_BENCH_QUICK", None)
    return env


def run(cmd, timeout, log, env):
    """Run ``cmd`` from the repository root, output to ``log``; stop its whole process group at the time
    limit. Returns (return code or None, timed out, seconds)."""
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=max(1, timeout)), False, round(time.monotonic() - start, 1)
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            out.write(f"\n[gpu_check] stopped after {timeout} s\n")
            return None, True, round(time.monotonic() - start, 1)


def tail(log, lines=25):
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def junit_counts(path):
    """{tests, passed, failed, errors, skipped, failures: [names]} from a junit XML file, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"total": counts["tests"], "passed": passed,
            "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
            "failures": failed[:30]}


# ===================================================================================== stages
def stage_tests(args, env, timeout, gpu):
    junit, log = LOGS / "gpu-tests.xml", LOGS / "gpu-tests.log"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    rc, timed_out, seconds = run(cmd, timeout, log, env)
    counts = junit_counts(junit) or {"total": None, "passed": None, "failed": None, "errors": None,
                                     "skipped": None, "failures": []}
    result = {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": seconds, "log": _rel(log),
              "junit": _rel(junit), **counts}
    if timed_out:
        result["status"], result["problem"] = "timeout", f"stopped after {timeout} s"
    elif counts["total"] is None:
        result["status"], result["problem"] = "failed", f"no junit report (pytest exit code {rc})"
    elif counts["failed"] or counts["errors"] or rc not in (0, 5):
        result["status"], result["problem"] = "failed", f"{counts['failed']} failed, {counts['errors']} errors"
    elif not counts["passed"]:
        result["status"] = "skipped"
        result["problem"] = None if gpu else "no usable GPU: every GPU test skipped"
    else:
        result["status"] = "ok"
    return result


def find_sanitizer():
    """compute-sanitizer: $COMPUTE_SANITIZER, the PATH, or the usual CUDA install folders."""
    candidates = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer"),
                  "/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
    candidates += sorted(str(p) for p in Path("/usr/local").glob("cuda-*/bin/compute-sanitizer"))
    candidates += sorted(str(p) for p in Path("/opt/nvidia").glob("**/compute-sanitizer") if p.is_file())
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


_SUMMARY = re.compile(r"ERROR SUMMARY:\s+(\d+)\s+error")
_RACE = re.compile(r"RACECHECK SUMMARY:\s+(\d+)\s+hazards?\s+displayed\s+\((\d+)\s+errors?,\s+(\d+)\s+warnings?\)")


def parse_sanitizer_log(text):
    """(errors or None, racecheck hazards/warnings dict or None) from a compute-sanitizer log. racecheck
    ends with its RACECHECK SUMMARY line only (no ERROR SUMMARY): its errors are that line's."""
    errors = [int(m) for m in _SUMMARY.findall(text)]
    races = _RACE.findall(text)
    race = None
    if races:
        race = {"hazards": sum(int(r[0]) for r in races), "errors": sum(int(r[1]) for r in races),
                "warnings": sum(int(r[2]) for r in races)}
    if errors:
        return sum(errors), race
    return (race["errors"] if race else None), race


def stage_sanitizer(args, env, timeout, gpu):
    if not gpu:
        return {"status": "skipped", "problem": "no usable GPU", "errors": None, "tools": {}}
    exe = find_sanitizer()
    if not exe:
        return {"status": "failed", "problem": "compute-sanitizer not found (PATH, /usr/local/cuda*/bin, "
                "$COMPUTE_SANITIZER)", "errors": None, "tools": {}}
    env = dict(env, GPUCNN_NO_POOL="1")
    files = [f for f in SANITIZER_FILES if (ROOT / f).is_file()]
    tools = [t for t in args.tools.split(",") if t]
    per_tool = timeout / max(1, len(tools))
    result = {"executable": exe, "pool": "off (GPUCNN_NO_POOL=1)", "files": files, "selection": args.sanitizer_k,
              "tools": {}}
    deadline = time.monotonic() + timeout
    for i, tool in enumerate(tools):
        left = deadline - time.monotonic()
        budget = min(left, max(per_tool, left / (len(tools) - i)))  # time a quick tool left goes to the next
        log, junit = LOGS / f"sanitizer-{tool}.log", LOGS / f"sanitizer-{tool}.xml"
        junit.unlink(missing_ok=True)
        cmd = [exe, "--tool", tool, "--print-limit", "100", sys.executable, "-m", "pytest", *files, "-m", "gpu",
               "-k", args.sanitizer_k, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        if budget < 5:
            result["tools"][tool] = {"status": "timeout", "problem": "no time left in the stage", "errors": None}
            continue
        rc, timed_out, seconds = run(cmd, budget, log, env)
        errors, race = parse_sanitizer_log(Path(log).read_text(errors="replace"))
        counts = junit_counts(junit) or {}
        entry = {"errors": errors, "returncode": rc, "seconds": seconds, "log": _rel(log),
                 "tests_passed": counts.get("passed"), "tests_failed": counts.get("failed"),
                 "tests_errors": counts.get("errors"), "tests_skipped": counts.get("skipped")}
        if race:
            entry["racecheck"] = race
        if timed_out:
            entry["status"], entry["problem"] = "timeout", f"stopped after {int(budget)} s"
        elif errors is None:
            entry["status"], entry["problem"] = "failed", "no ERROR/RACECHECK SUMMARY line in the sanitizer's output"
        elif errors:
            entry["status"], entry["problem"] = "failed", f"{errors} sanitizer errors"
        elif counts.get("failed") or counts.get("errors") or rc not in (0, 5):
            entry["status"], entry["problem"] = "failed", f"the tests failed under the sanitizer (exit code {rc})"
        elif not counts.get("passed"):
            entry["status"], entry["problem"] = "failed", "no test ran under the sanitizer"
        else:
            entry["status"] = "ok"
        result["tools"][tool] = entry
    found = [t["errors"] for t in result["tools"].values() if t.get("errors") is not None]
    result["errors"] = sum(found) if found else None
    bad = {k: v["problem"] for k, v in result["tools"].items() if v["status"] != "ok"}
    result["status"] = "failed" if bad else "ok"
    if bad:
        result["problem"] = "; ".join(f"{k}: {v}" for k, v in bad.items())
    return result


def stage_bench(args, env, timeout, gpu):
    quick = not args.full
    log, junit, bench_json = LOGS / "bench.log", LOGS / "bench.xml", RESULTS / "pytest-benchmark.json"
    for stale in (junit, bench_json):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={bench_json}", f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    if quick:
        cmd += ["-k", "not numpy_vs_torch_cpu"]  # the CPU benchmark runs in the full suite only
    started = time.time()
    rc, timed_out, seconds = run(cmd, timeout, log, env)
    counts = junit_counts(junit) or {}
    if bench_json.is_file() and bench_json.stat().st_size == 0:  # pytest-benchmark opens it even with nothing run
        bench_json.unlink()
    try:
        import summarize
        latest = summarize.summarize(RESULTS, quiet=True)
    except Exception as exc:
        latest, summary_problem = None, f"{type(exc).__name__}: {exc}"
    else:
        summary_problem = None
    written = sorted(_rel(p) for p in RESULTS.glob("*") if p.is_file() and p.stat().st_mtime >= started)
    result = {"command": " ".join(cmd[1:]), "quick": quick, "returncode": rc, "seconds": seconds, "log": _rel(log),
              "passed": counts.get("passed"), "failed": counts.get("failed"), "errors": counts.get("errors"),
              "skipped": counts.get("skipped"), "failures": counts.get("failures", []),
              "results_written": written, "pytest_benchmark_json": _rel(bench_json) if bench_json.is_file() else None,
              "latest": _rel(RESULTS / "latest.json") if latest else None}
    if summary_problem:
        result["summary_problem"] = summary_problem
    if timed_out:
        result["status"], result["problem"] = "timeout", f"stopped after {timeout} s (results so far are kept)"
    elif counts.get("failed") or counts.get("errors") or rc not in (0, 5):
        result["status"], result["problem"] = "failed", f"pytest exit code {rc}"
    elif gpu and not latest:
        result["status"], result["problem"] = "failed", "no GPU benchmark result was written"
    else:
        result["status"] = "ok" if gpu else "skipped"
    return result


# ===================================================================================== main
def parse_args(argv):
    p = argparse.ArgumentParser(description="GPU tests, compute-sanitizer and benchmarks in one command.")
    p.add_argument("--stage", action="append", choices=STAGES, help="run only this stage (repeatable)")
    p.add_argument("--out", default=str(RESULTS / "gpu-check.json"), help="the summary JSON to write")
    p.add_argument("--fresh", action="store_true", help="do not keep earlier stages' results from --out")
    p.add_argument("--full", action="store_true", help="the whole benchmark suite, not the quick one")
    p.add_argument("--require-gpu", action="store_true", help="fail when no GPU is usable (on the GPU machine)")
    p.add_argument("--budget", type=float, default=540, help="seconds for all stages together (default 540)")
    for stage in STAGES:
        p.add_argument(f"--timeout-{stage}", type=float, default=None,
                       help=f"seconds for the {stage} stage (default {DEFAULT_TIMEOUTS[stage]}"
                            + (f"; {DEFAULT_TIMEOUTS['bench_full']} with --full" if stage == "bench" else "") + ")")
    p.add_argument("--tools", default=",".join(TOOLS), help="sanitizer tools, comma-separated")
    p.add_argument("--sanitizer-k", default=SANITIZER_EXPR, help="pytest -k selection run under the sanitizer")
    p.add_argument("--logs", default=str(LOGS), help="folder of the stages' logs (default benchmarks/results/logs)")
    p.add_argument("--bundle", default=None, help="also write benchmarks/results (logs included) as this .tar.gz")
    return p.parse_args(argv)


def main(argv=None):
    global LOGS
    args = parse_args(argv)
    stages = [s for s in STAGES if s in (args.stage or STAGES)]
    out = Path(args.out)
    LOGS = Path(args.logs).resolve()
    LOGS.mkdir(parents=True, exist_ok=True)
    env = environment(quick=not args.full)
    from gpucnn import backend
    gpu, reason = backend.gpu_status()
    device = gpu_info()
    report = {}
    if out.is_file() and not args.fresh:
        try:
            report = json.loads(out.read_text())
        except ValueError:
            report = {}
    report.update({"device": device.get("nvidia_smi_name") or device.get("name"), "date": _now(), "commit": commit(),
                   "device_details": device, "gpu_usable": gpu, "gpu_problem": reason, "stages_run": stages,
                   "gpucnn_home": env.get("GPUCNN_HOME")})
    if not (Path(env.get("GPUCNN_HOME") or Path.home() / ".gpucnn") / "datasets" / "mnist.npz").is_file():
        print("gpu_check: no MNIST cache found ($GPUCNN_HOME or .data/datasets/mnist.npz): MNIST tests and "
              "benchmarks will skip or fail", file=sys.stderr)
    deadline = time.monotonic() + args.budget
    runners = {"tests": stage_tests, "sanitizer": stage_sanitizer, "bench": stage_bench}
    problems = []
    for stage in stages:
        default = DEFAULT_TIMEOUTS["bench_full" if stage == "bench" and args.full else stage]
        limit = getattr(args, f"timeout_{stage}") or default
        limit = min(limit, deadline - time.monotonic())
        print(f"gpu_check: {stage} (at most {int(limit)} s) ...", flush=True)
        if limit < 5:
            result = {"status": "timeout", "problem": "no time left in --budget"}
        else:
            result = runners[stage](args, env, limit, gpu)
        result.update(date=_now(), commit=report["commit"])
        report[stage] = result
        failed = result["status"] in ("failed", "timeout") or (args.require_gpu and not gpu)
        if failed:
            problems.append(f"{stage}: {result.get('problem') or ('no usable GPU: ' + str(reason))}")
        log = result.get("log")
        if failed and log:
            print(tail(ROOT / log), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        report["ok"], report["problems"] = not problems, problems
        out.write_text(json.dumps(report, indent=2) + "\n")  # after each stage: a cut-off run keeps what it did
    if args.bundle:
        with tarfile.open(args.bundle, "w:gz") as tar:
            tar.add(RESULTS, arcname=_rel(RESULTS))
    print_summary(report, stages, out)
    return 0 if not problems else 1


def print_summary(report, stages, out):
    print(f"\ngpu_check on {report['device'] or 'no GPU'} (commit {report['commit']}), {report['date']}")
    if "tests" in stages:
        t = report["tests"]
        print(f"  tests      {t['status']:8} passed {t.get('passed')}, failed {t.get('failed')}, "
              f"errors {t.get('errors')}, skipped {t.get('skipped')} ({t.get('seconds')} s)")
    if "sanitizer" in stages:
        s = report["sanitizer"]
        tools = ", ".join(f"{k} {v.get('errors')}" + ("" if v.get("status") == "ok" else f" [{v.get('status')}]")
                          for k, v in s.get("tools", {}).items())
        print(f"  sanitizer  {s['status']:8} errors {s.get('errors')}" + (f" ({tools})" if tools else "")
              + (f" — {s['problem']}" if s.get("problem") and s["status"] != "failed" else ""))
    if "bench" in stages:
        b = report["bench"]
        print(f"  bench      {b['status']:8} passed {b.get('passed')}, failed {b.get('failed')}, "
              f"skipped {b.get('skipped')} ({b.get('seconds')} s); latest: {b.get('latest')}")
    for p in report.get("problems", []):
        print(f"  PROBLEM    {p}")
    print(f"  report     {_rel(out)}")


if __name__ == "__main__":
    sys.exit(main())
