"""The GPU machine's check: one command per device session, each within one device call (benchmarks/README.md).

    python3 benchmarks/gpu_check.py              session 1 (``make gpu-check``): pre-flight, the GPU tests, the
                                                 sanitizer (positive control, memcheck, synccheck), the kernels
                                                 against cuDNN at batch 64
    python3 benchmarks/gpu_check.py --session 2  session 2: racecheck and initcheck, training against PyTorch
                                                 eager and torch.compile, scaling
    python3 benchmarks/gpu_check.py --plan       the plan only

It first prints its plan: the stages in order of value, each one's time limit, and the total, at most
``BUDGET`` (570 s) so that one device call of 600 s holds it. It does so on any machine; without a usable GPU
it then stops with one line, "gpu_check: no GPU: <why>".

Exit status: 0 every stage ran and passed (a sanitizer this machine refuses, or that its positive control
shows to be blind, is "unavailable": reported, not a failure); 1 a stage failed or was cut at its limit;
2 bad arguments; 3 no usable GPU (nothing ran).

Each stage runs as a subprocess in a process group of its own and is bounded: ``GRACE`` seconds before its
limit it gets SIGINT, so that pytest stops and still writes its JUnit file and summary, then SIGTERM and
SIGKILL if it has not ended at the limit. Time a stage does not use goes to the stages after it. The summary
(``--out``; default benchmarks/results/gpu-check.json, gpu-check-session-2.json for session 2) is written
before the first stage and after every stage, so a run cut anywhere keeps what it did, and copied with the
logs and the benchmark results into ``--export`` (default: $OUT when set, the folder the device tool brings
back).

The sanitizer stage runs compute-sanitizer over a selection of GPU tests with CuPy's memory pools off
(GPUCNN_NO_POOL=1, tests/conftest.py). First a positive control (sanitizer_control.py: a deliberate write past
the end of an array) must be reported, else the tools are "unavailable" here. Errors are counted only in
gpucnn's own kernels (kernels/*.cu); those of other kernels (CuPy's CUB and thrust sorts and reductions) and
failed CUDA API calls are listed separately.

Runs from the repository root with plain ``python3`` (no install; the repository goes on PYTHONPATH).
MNIST: $GPUCNN_HOME, else .data/ when it holds datasets/mnist.npz (carried to the GPU machine); the commit:
$GPUCNN_COMMIT, else git, else .data/COMMIT.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path[:0] = [str(ROOT), str(HERE)]

from sanitizer_control import CONTROL_KERNEL  # noqa: E402  (no CuPy at import)

BUDGET = 570   # seconds of a whole session: one device call of 600 s, with room to start and hand back
GRACE = 12     # seconds between a stage's SIGINT and its limit (pytest writes its reports in that time)
RESERVE = 30   # seconds of the budget kept outside the stages (start-up, signals, the summary)

# The sanitizer's selection: a few cases of each op family, the fused and fast-path kernels, a CUDA-graph
# step, the fast path's graphs and a short fit (benchmarks/gpu_smoke.py).
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
    "test_weight_decay_matches_reference",
    "test_dropout_mask and 0.5",
    "test_conv2d_relu_maxpool_forward_matches_reference and 32-relu-True",
    "test_conv2d_maxpool_backward_matches_reference and 32-relu-True",
    "test_the_fused_kernel_launched_without_pooled_output_writes_nothing",
    "test_gather_batch_copies_the_steps_rows and 784",
    "test_a_step_can_be_captured_in_a_cuda_graph",
    "test_the_fast_path_is_used_and_has_a_last_batch_graph",
    "test_short_fit_and_evaluate_on_the_gpu",
)
SANITIZER_EXPR = " or ".join(f"({t})" for t in SANITIZER_TESTS)
# initcheck reports reads of memory no kernel wrote inside CUB's (and thrust's, built on CUB:
# thrust::cuda_cub) sort and reduction kernels, known reports of those libraries: not instrumented.
TOOL_OPTIONS = {"initcheck": ("--kernel-name-exclude", "kns=cub")}


# ===================================================================================== small helpers
def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _rel(path):
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def commit():
    """$GPUCNN_COMMIT, else ``git describe``, else .data/COMMIT (written before the tree goes to the GPU
    machine, whose copy has no .git), else None."""
    from bench_utils import commit as git_commit
    found = git_commit()
    if found:
        return found
    stamp = ROOT / ".data" / "COMMIT"
    if stamp.is_file():
        return stamp.read_text().strip() or None
    return None


def environment(logs):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE)] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env["GPUCNN_BENCH_QUICK"] = "1"
    env.pop("GPUCNN_ALLOW_DOWNLOAD", None)  # no network there: MNIST tests skip without the cache
    if not env.get("GPUCNN_HOME") and (ROOT / ".data" / "datasets" / "mnist.npz").is_file():
        env["GPUCNN_HOME"] = str(ROOT / ".data")
    env["GPUCNN_CHECK_LOGS"] = str(logs)
    return env


def run(cmd, limit, log, env):
    """Run ``cmd`` from the repository root, its output to ``log``, in a process group of its own. At
    ``limit - GRACE`` seconds the group gets SIGINT, then SIGTERM and SIGKILL if it has not ended by the
    limit. Returns (return code, interrupted, seconds)."""
    start = time.monotonic()
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + shlex.join(str(c) for c in cmd) + "\n")
        out.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        soft = max(1.0, limit - GRACE)
        try:
            return proc.wait(timeout=soft), False, round(time.monotonic() - start, 1)
        except subprocess.TimeoutExpired:
            pass
        for sig, wait in ((signal.SIGINT, max(1.0, limit - soft)), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        out.write(f"\n[gpu_check] interrupted (SIGINT) after {soft:.0f} s of its {limit:.0f} s limit\n")
    return proc.returncode, True, round(time.monotonic() - start, 1)


def tail(log, lines=25):
    try:
        return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def junit_counts(path):
    """{total, passed, failed, errors, skipped, failures: [names]} from a JUnit XML file, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"total": counts["tests"], "passed": passed, "failed": counts["failures"], "errors": counts["errors"],
            "skipped": counts["skipped"], "failures": failed[:30]}


def pytest_stage(name, args, limit, logs, env):
    """``python -m pytest <args>`` as a bounded stage with a JUnit report; counted even when it was cut."""
    log, junit = logs / f"{name}.log", logs / f"{name}.xml"
    junit.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", "-rfE", "--durations=10",
           f"--junitxml={junit}", "-o", "junit_family=xunit2"]
    rc, interrupted, seconds = run(cmd, limit, log, env)
    counts = junit_counts(junit)
    result = {"command": shlex.join(cmd[1:]), "returncode": rc, "seconds": seconds, "log": _rel(log),
              "junit": _rel(junit) if counts else None,
              **(counts or {"total": None, "passed": None, "failed": None, "errors": None, "skipped": None,
                            "failures": []})}
    if interrupted:
        result["status"] = "timeout"
        result["problem"] = (f"stopped at its {limit:.0f} s limit; the tests that finished are counted"
                             if counts else f"stopped at its {limit:.0f} s limit, before pytest wrote a report")
    elif counts is None:
        result["status"], result["problem"] = "failed", f"no JUnit report (pytest exit code {rc})"
    elif counts["failed"] or counts["errors"] or rc not in (0, 5):
        result["status"], result["problem"] = "failed", f"{counts['failed']} failed, {counts['errors']} errors"
    else:
        result["status"] = "ok" if counts["passed"] else "skipped"
    return result


# ===================================================================================== sanitizer logs
_SUMMARY = re.compile(r"^=+ ERROR SUMMARY:\s+(\d+)\s+errors?", re.M)
_RACE = re.compile(r"RACECHECK SUMMARY:\s+(\d+)\s+hazards?\s+displayed\s+\((\d+)\s+errors?,\s+(\d+)\s+warnings?\)")
_HEADER = re.compile(r"^=+ (\S.*?)\s*$")       # the first line of a report: one space after the prefix
_DETAIL = re.compile(r"^=+\s{2,}(\S.*?)\s*$")   # its indented lines
_NOT_REPORTS = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY",
                "Target application returned")
_RACE_AT = re.compile(r"access at (.+?)\+0x[0-9a-fA-F]+")


def _tool_error(header):
    """Whether a top-level line is the tool's own error (it refused the device or the program), not a
    finding."""
    return ((header.startswith("Error") and "Race reported" not in header)
            or header.startswith("Internal Sanitizer Error") or "not supported" in header.lower())


def location_kernel(location):
    """The kernel of a report's location: "conv2d_forward+0x70 in /tmp/k.cu:12", "conv2d_forward+0x70",
    "0x70 in conv2d_forward", "void cub::DeviceReduceKernel<...>(...)+0x1a0"."""
    text = re.sub(r"\s+in\s+\S+:\d+\s*$", "", location.strip())  # the source file and line
    found = re.match(r"^0x[0-9a-fA-F]+\s+in\s+(.+)$", text)       # the older "0x70 in kernel"
    if found:
        text = found.group(1)
    return re.sub(r"\+0x[0-9a-fA-F]+$", "", text).strip()


def plain_name(kernel):
    """"void cub::ns::DeviceReduceKernel<int>(int*)" -> "cub::ns::DeviceReduceKernel"; C names stay."""
    words = re.split(r"[<(]", kernel, maxsplit=1)[0].split()
    return words[-1] if words else kernel


def parse_sanitizer_log(text, own_kernels):
    """What a compute-sanitizer log says: ``errors`` (its ERROR SUMMARY, or racecheck's errors; None when
    there is no summary), ``own`` ({gpucnn kernel: reports}), ``own_errors``, ``others`` ({other kernel, or
    "CUDA API: ...": reports}), ``unattributed`` (errors the summary counts beyond the reports printed),
    ``racecheck`` (hazards, errors, warnings) and ``tool_error`` (the tool's own first error line)."""
    reports, tool_error, lines = [], None, text.splitlines()
    for i, line in enumerate(lines):
        header = _HEADER.match(line)
        if not header or _DETAIL.match(line):
            continue
        what = header.group(1)
        if what.startswith(_NOT_REPORTS):
            continue
        if _tool_error(what):
            tool_error = tool_error or what
            continue
        warning = what.startswith("Warning")
        race = _RACE_AT.search(what)
        if race:
            kernel = location_kernel(race.group(1))
        elif what.startswith("Program hit"):
            kernel = "CUDA API: " + what[len("Program hit "):].split(" on CUDA API call")[0][:120]
        else:
            kernel = None
            for detail in lines[i + 1:i + 4]:
                found = _DETAIL.match(detail)
                if found and found.group(1).startswith("at "):
                    kernel = location_kernel(found.group(1)[3:])
                    break
        reports.append((kernel or "unattributed", warning))
    summaries = [int(n) for n in _SUMMARY.findall(text)]
    races = _RACE.findall(text)
    race = {"hazards": sum(int(r[0]) for r in races), "errors": sum(int(r[1]) for r in races),
            "warnings": sum(int(r[2]) for r in races)} if races else None
    errors = sum(summaries) if summaries else (race["errors"] if race else None)
    own, others = {}, {}
    for kernel, warning in reports:
        if warning:
            continue
        bucket = own if plain_name(kernel) in own_kernels else others
        bucket[kernel[:200]] = bucket.get(kernel[:200], 0) + 1
    counted = sum(own.values()) + sum(others.values())
    return {"errors": errors, "own_errors": sum(own.values()), "own": own, "others": others,
            "unattributed": max(0, (errors or 0) - counted), "racecheck": race, "tool_error": tool_error}


def judge_sanitizer_run(parsed, counts, returncode, interrupted):
    """(status, problem) of a sanitizer run over the tests."""
    if parsed["own_errors"]:
        return "failed", f"{parsed['own_errors']} errors in gpucnn's kernels: {parsed['own']}"
    if interrupted:
        return "timeout", "stopped at its limit"
    if parsed["errors"] is None:
        if parsed["tool_error"]:
            return "unavailable", f"the tool refused to run: {parsed['tool_error']}"
        return "failed", f"no ERROR SUMMARY line in the sanitizer's output (exit code {returncode})"
    if parsed["unattributed"] and not parsed["others"]:
        return "failed", f"{parsed['unattributed']} errors the log does not attribute to a kernel"
    if counts is None or counts["failed"] or counts["errors"]:
        return "failed", f"the tests failed under the sanitizer (exit code {returncode})"
    if not counts["passed"]:  # a sanitizer that ran nothing and reports 0 errors is no pass
        return "failed", "no test ran under the sanitizer"
    return "ok", None


def judge_control(parsed, text, interrupted):
    """(status, problem) of the positive control: its deliberate out-of-bounds write must be reported."""
    if interrupted:
        return "timeout", "stopped at its limit"
    if any(plain_name(k) == CONTROL_KERNEL for k in parsed["others"]):
        return "ok", None
    if parsed["errors"] is None:
        return "unavailable", (f"the tool refused to run: {parsed['tool_error']}" if parsed["tool_error"] else
                               "no ERROR SUMMARY line: the sanitizer did not run the control program")
    if "control kernel launched" not in text:
        return "failed", "the control program did not launch its kernel (see its log)"
    return "unavailable", ("the deliberate out-of-bounds write was not reported: the sanitizer checks nothing "
                           "on this machine, so its clean results would prove nothing")


def own_kernels():
    from gpucnn.engines import cuda_loader
    return set(cuda_loader._kernel_table())


# ===================================================================================== stages
def stage_preflight(limit, logs, env):
    """versions, kernels compiled, resources against launch blocks, fused vs unfused, a captured graph,
    DLPack with torch (gpu_preflight.py)."""
    report, log = logs / "preflight.json", logs / "preflight.log"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "gpu_preflight.py"), "--out", str(report)]
    rc, interrupted, seconds = run(cmd, limit, log, env)
    try:
        found = json.loads(report.read_text())
    except (OSError, ValueError):
        found = {}
    checks = found.get("checks", {})
    bad = {k: v.get("problem") for k, v in checks.items() if v.get("status") != "ok"}
    result = {"returncode": rc, "seconds": seconds, "log": _rel(log), "report": _rel(report) if found else None,
              "checks": {k: v.get("status") for k, v in checks.items()}, "device": found.get("device"),
              "versions": found.get("versions"), "resources": found.get("resources_summary")}
    if interrupted:
        result["status"], result["problem"] = "timeout", f"stopped at its {limit:.0f} s limit"
    elif not checks:
        result["status"], result["problem"] = "failed", f"no pre-flight report (exit code {rc})"
    elif bad:
        result["status"], result["problem"] = "failed", "; ".join(f"{k}: {v}" for k, v in bad.items())
    else:
        result["status"] = "ok"
    return result


def stage_tests(limit, logs, env):
    """``pytest -m gpu tests``: every GPU test."""
    return pytest_stage("gpu-tests", ["-m", "gpu", "tests"], limit, logs, env)


def find_sanitizer():
    """compute-sanitizer: $COMPUTE_SANITIZER, the PATH, or the usual CUDA install folders."""
    candidates = [os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer"),
                  "/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
    candidates += sorted(str(p) for p in Path("/usr/local").glob("cuda-*/bin/compute-sanitizer"))
    candidates += sorted(str(p) for p in Path("/opt/nvidia").glob("**/compute-sanitizer") if p.is_file())
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def sanitizer_stage(tools, limit, logs, env):
    """The positive control, then each tool over the selection, sharing ``limit`` (time a tool leaves goes
    to the next)."""
    exe = find_sanitizer()
    if not exe:
        return {"status": "unavailable", "problem": "compute-sanitizer not found (PATH, /usr/local/cuda*/bin, "
                "$COMPUTE_SANITIZER)", "tools": {}}
    env = dict(env, GPUCNN_NO_POOL="1")
    deadline = time.monotonic() + limit
    result = {"executable": exe, "pool": "off (GPUCNN_NO_POOL=1)", "files": list(SANITIZER_FILES),
              "selection": SANITIZER_EXPR, "tools": {}}
    log = logs / "sanitizer-control.log"
    rc, interrupted, seconds = run([exe, "--tool", "memcheck", sys.executable, str(HERE / "sanitizer_control.py")],
                                   min(40, limit / 4), log, env)
    text = Path(log).read_text(errors="replace")
    parsed = parse_sanitizer_log(text, set())
    status, problem = judge_control(parsed, text, interrupted)
    result["control"] = {"status": status, "problem": problem, "seconds": seconds, "log": _rel(log),
                         "reported": parsed["others"]}
    if status != "ok":
        result["status"], result["problem"] = ("failed" if status == "failed" else "unavailable"), \
            f"positive control: {problem}"
        return result
    kernels = own_kernels()
    for i, tool in enumerate(tools):
        left = deadline - time.monotonic()
        budget = left / (len(tools) - i)
        log, junit = logs / f"sanitizer-{tool}.log", logs / f"sanitizer-{tool}.xml"
        junit.unlink(missing_ok=True)
        if budget < GRACE + 5:
            result["tools"][tool] = {"status": "timeout", "problem": "no time left in the stage"}
            continue
        cmd = [exe, "--tool", tool, "--print-limit", "10000", *TOOL_OPTIONS.get(tool, ()), sys.executable, "-m",
               "pytest", *SANITIZER_FILES, "-m", "gpu", "-k", SANITIZER_EXPR, "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        rc, interrupted, seconds = run(cmd, budget, log, env)
        parsed = parse_sanitizer_log(Path(log).read_text(errors="replace"), kernels)
        counts = junit_counts(junit)
        status, problem = judge_sanitizer_run(parsed, counts, rc, interrupted)
        entry = {"status": status, "problem": problem, "errors": parsed["errors"],
                 "errors_in_gpucnn_kernels": parsed["own_errors"], "gpucnn_kernels": parsed["own"],
                 "other_kernels_and_api": parsed["others"], "unattributed": parsed["unattributed"],
                 "returncode": rc, "seconds": seconds, "log": _rel(log),
                 **{f"tests_{k}": (counts or {}).get(k) for k in ("passed", "failed", "errors", "skipped")}}
        if parsed["racecheck"]:
            entry["racecheck"] = parsed["racecheck"]
        result["tools"][tool] = entry
    result["errors_in_gpucnn_kernels"] = sum(v.get("errors_in_gpucnn_kernels") or 0 for v in result["tools"].values())
    result["status"] = overall_status(v["status"] for v in result["tools"].values())
    problems = "; ".join(f"{k}: {v['problem']}" for k, v in result["tools"].items() if v["status"] != "ok")
    if problems:
        result["problem"] = problems
    return result


def overall_status(statuses):
    """A stage's status from its parts': failed, else timeout, else unavailable when none ran, else ok."""
    statuses = set(statuses)
    for status in ("failed", "timeout"):
        if status in statuses:
            return status
    return "unavailable" if statuses == {"unavailable"} else "ok"


def benchmark_stage(name, files, k, limit, logs, env):
    """pytest-benchmark over ``files`` (QUICK settings), then summarize.py."""
    bench_json = RESULTS / f"pytest-benchmark-{name}.json"
    bench_json.unlink(missing_ok=True)
    started = time.time()
    args = [*files, "--benchmark-only", f"--benchmark-json={bench_json}"] + (["-k", k] if k else [])
    result = pytest_stage(name, args, limit, logs, env)
    if bench_json.is_file() and bench_json.stat().st_size == 0:  # opened by pytest-benchmark, nothing run
        bench_json.unlink()
    try:
        import summarize
        latest = summarize.summarize(RESULTS, quiet=True)
    except Exception as exc:  # the summary must not hide the stage's own result
        latest, result["summary_problem"] = None, f"{type(exc).__name__}: {exc}"
    result["results_written"] = sorted(_rel(p) for p in RESULTS.glob("*") if p.is_file()
                                       and p.stat().st_mtime >= started)
    result["latest"] = _rel(RESULTS / "latest.json") if latest else None
    if result["status"] == "ok" and not result["results_written"]:
        result["status"], result["problem"] = "failed", "no benchmark result was written"
    return result


def stage_sanitizer(limit, logs, env):
    """compute-sanitizer: the positive control, then memcheck and synccheck over the selection."""
    return sanitizer_stage(("memcheck", "synccheck"), limit, logs, env)


def stage_bench(limit, logs, env):
    """The kernels against cuDNN, cuBLAS and PyTorch's max-pool at batch 64 (test_kernels_vs_cudnn.py)."""
    return benchmark_stage("bench-kernels", ["benchmarks/test_kernels_vs_cudnn.py"], "64]", limit, logs, env)


def stage_sanitizer2(limit, logs, env):
    """compute-sanitizer: the positive control, then racecheck and initcheck (CUB and thrust excluded)."""
    return sanitizer_stage(("racecheck", "initcheck"), limit, logs, env)


def stage_training(limit, logs, env):
    """One epoch and five epochs of the seed model on MNIST: gpucnn, PyTorch eager, torch.compile."""
    return benchmark_stage("bench-training", ["benchmarks/test_training_vs_torch.py"], None, limit, logs, env)


def stage_scaling(limit, logs, env):
    """Training images/s as the batch and the image grow, gpucnn against PyTorch eager."""
    return benchmark_stage("bench-scaling", ["benchmarks/test_scaling.py"], None, limit, logs, env)


# name, limit in seconds (the SIGINT comes GRACE seconds before it), runner; in order of value
SESSIONS = {
    1: (("preflight", 45, stage_preflight), ("tests", 170, stage_tests), ("sanitizer", 165, stage_sanitizer),
        ("bench", 160, stage_bench)),
    2: (("sanitizer", 170, stage_sanitizer2), ("training", 250, stage_training), ("scaling", 120, stage_scaling)),
}


def plan_lines(session):
    stages = SESSIONS[session]
    total = sum(limit for _, limit, _ in stages) + RESERVE
    lines = [f"gpu_check session {session}: {len(stages)} stages, at most {total} s "
             f"(budget {BUDGET} s; each stage gets SIGINT {GRACE} s before its limit, unused time goes on)"]
    for i, (name, limit, runner) in enumerate(stages, 1):
        lines.append(f"  {i}. {name:10} {limit:4d} s  {' '.join((runner.__doc__ or '').split())}")
    lines.append(f"  +  reserve    {RESERVE:4d} s  start-up, signals, summary")
    return lines, total


# ===================================================================================== main
def parse_args(argv):
    p = argparse.ArgumentParser(description="The GPU machine's check, within one device call (exit status: 0 "
                                "passed, 1 a stage failed or was cut, 2 bad arguments, 3 no usable GPU).")
    p.add_argument("--session", type=int, choices=sorted(SESSIONS), default=1,
                   help="1: pre-flight, tests, sanitizer, kernel benchmarks; 2: racecheck/initcheck, training "
                        "and scaling benchmarks")
    p.add_argument("--plan", action="store_true", help="print the plan and stop")
    p.add_argument("--stage", action="append", help="run only this stage of the session (repeatable)")
    p.add_argument("--out", default=None, help="the summary JSON (default benchmarks/results/gpu-check.json; "
                   "gpu-check-session-2.json for session 2)")
    p.add_argument("--logs", default=str(RESULTS / "logs"), help="folder of the stages' logs")
    p.add_argument("--export", default=os.environ.get("OUT") or None,
                   help="folder to copy the summary, logs and results into after every stage (default: $OUT)")
    args = p.parse_args(argv)
    args.out = args.out or str(RESULTS / ("gpu-check.json" if args.session == 1 else
                                          f"gpu-check-session-{args.session}.json"))
    names = [name for name, _, _ in SESSIONS[args.session]]
    for name in args.stage or ():
        if name not in names:
            p.error(f"session {args.session} has no stage {name!r} (its stages: {', '.join(names)})")
    return args


def gpu_status():
    from gpucnn import backend
    return backend.gpu_status()


def export(out, logs, folder):
    """Copy the summary, the logs and the result files into ``folder`` (what the device tool brings back)."""
    if not folder:
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out, folder / Path(out).name)
        for source, name in ((logs, "logs"), (RESULTS, "results")):
            for path in Path(source).glob("*"):
                if path.is_file() and path.resolve() != Path(out).resolve():
                    (folder / name).mkdir(exist_ok=True)
                    shutil.copy2(path, folder / name / path.name)
    except OSError as exc:  # a full disk must not end the check
        print(f"gpu_check: could not copy the results to {folder}: {exc}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    lines, total = plan_lines(args.session)
    print("\n".join(lines), flush=True)
    if args.plan:
        return 0
    t0 = time.monotonic()
    usable, reason = gpu_status()
    if not usable:
        if args.export:  # what the device tool brings back says why nothing ran
            Path(args.export).mkdir(parents=True, exist_ok=True)
            (Path(args.export) / Path(args.out).name).write_text(json.dumps(
                {"session": args.session, "date": _now(), "gpu_usable": False, "gpu_problem": str(reason)}) + "\n")
        print(f"gpu_check: no GPU: {reason}", flush=True)
        return 3
    stages = [s for s in SESSIONS[args.session] if not args.stage or s[0] in args.stage]
    out, logs = Path(args.out), Path(args.logs).resolve()
    logs.mkdir(parents=True, exist_ok=True)
    env = environment(logs)
    from bench_utils import _nvidia_smi
    report = {"session": args.session, "date": _now(), "commit": commit(), "device": _nvidia_smi("name"),
              "gpucnn_home": env.get("GPUCNN_HOME"), "plan": {name: limit for name, limit, _ in stages},
              "budget_seconds": total, "stages": {name: {"status": "pending"} for name, _, _ in stages},
              "ok": None, "problems": [], "notes": []}
    if not env.get("GPUCNN_HOME"):
        report["notes"].append("no MNIST cache ($GPUCNN_HOME or .data/datasets/mnist.npz): MNIST tests and "
                               "benchmarks skip")

    def write():
        out.parent.mkdir(parents=True, exist_ok=True)
        report["seconds"] = round(time.monotonic() - t0, 1)
        out.write_text(json.dumps(report, indent=2) + "\n")
        export(out, logs, args.export)

    write()
    end = t0
    failed = False
    for name, limit, runner in stages:
        end += limit  # this stage may run until the planned end of it and the ones before
        allowed = end - time.monotonic()
        print(f"gpu_check: {name} (at most {allowed:.0f} s) ...", flush=True)
        started = time.monotonic()
        try:
            result = runner(allowed, logs, env)
        except Exception as exc:  # a bug of this script: recorded, and the next stages still run
            result = {"status": "failed", "problem": f"gpu_check itself: {type(exc).__name__}: {exc}"}
        result.setdefault("seconds", round(time.monotonic() - started, 1))
        result["limit_seconds"] = round(allowed)
        report["stages"][name] = result
        if name == "preflight" and result.get("device"):
            report["device"] = result["device"]
        if result["status"] in ("failed", "timeout"):
            failed = True
            report["problems"].append(f"{name}: {result['status']}: {result.get('problem')}")
            if result.get("log"):
                print(tail(ROOT / result["log"]), flush=True)
        report["ok"] = not failed
        write()  # after every stage: a run cut later keeps this one
    print_summary(report, out)
    return 1 if failed else 0


def print_summary(report, out):
    print(f"\ngpu_check session {report['session']} on {report['device'] or 'an unnamed device'} "
          f"(commit {report['commit']}), {report['date']}, {report['seconds']} s")
    for name, s in report["stages"].items():
        counts = "" if s.get("passed") is None else (f" passed {s.get('passed')}, failed {s.get('failed')}, "
                                                     f"errors {s.get('errors')}, skipped {s.get('skipped')}")
        tools = ", ".join(f"{k} {v['status']} ({v.get('errors_in_gpucnn_kernels')} in gpucnn's kernels)"
                          for k, v in s.get("tools", {}).items())
        print(f"  {name:10} {s['status']:11}{counts}{' ' + tools if tools else ''} ({s.get('seconds')} s)"
              + (f" — {s['problem']}" if s.get("problem") else ""))
    print(f"  report     {_rel(out)}")


if __name__ == "__main__":
    sys.exit(main())
