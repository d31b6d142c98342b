"""benchmarks/gpu_check.py (``make gpu-check``) and its helpers, checked without a GPU: the plans fit one device
call, a machine without a GPU gets the plan and one line, a stage cut at its limit keeps its finished tests,
the summary is written after every stage, compute-sanitizer logs are read right (errors counted only in
gpucnn's kernels, the positive control, a tool that refuses the device), and — on the CPU emulator — the
sanitizer's test selection exists and the pre-flight's GPU checks run."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
from conftest import skip_kernel_check  # noqa: E402

OWN = {"conv2d_forward", "maxpool2d_forward", "gather_batch"}


def _no_gpu_here():
    from gpucnn import backend
    if backend.gpu_status()[0]:
        pytest.skip("a GPU is usable here: gpu_check would run its stages")


# ===================================================================================== the plan
@pytest.mark.parametrize("session", sorted(gpu_check.SESSIONS))
def test_each_session_fits_one_device_call(session):
    lines, total = gpu_check.plan_lines(session)
    stages = gpu_check.SESSIONS[session]
    assert total == sum(limit for _, limit, _ in stages) + gpu_check.RESERVE <= gpu_check.BUDGET <= 570
    assert all(limit > gpu_check.GRACE + 10 for _, limit, _ in stages)
    assert f"at most {total} s" in lines[0]
    for (name, limit, _), line in zip(stages, lines[1:]):
        assert name in line and f"{limit} s" in line


def test_without_a_gpu_it_prints_the_plan_then_stops_with_one_line(tmp_path):
    _no_gpu_here()
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)
    lines = done.stdout.splitlines()
    plan, _ = gpu_check.plan_lines(1)
    assert done.returncode == 3, done.stdout + done.stderr
    assert lines[:len(plan)] == plan and len(lines) == len(plan) + 1
    assert lines[-1].startswith("gpu_check: no GPU: ") and not done.stderr
    assert json.loads((tmp_path / "out" / "gpu-check.json").read_text())["gpu_usable"] is False  # for $OUT


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_gpu_check_without_a_gpu_stops_after_the_plan():
    _no_gpu_here()
    done = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "OUT"})
    assert done.stdout.splitlines()[0].startswith("gpu_check session 1:")
    assert done.stdout.splitlines()[-1].startswith("gpu_check: no GPU: ")
    assert "Error 3" in done.stderr  # make's report of gpu_check's "no GPU" status


# ===================================================================================== stages
def test_a_stage_cut_at_its_limit_keeps_the_tests_that_finished(tmp_path, monkeypatch):
    """The stage gets SIGINT before its limit: pytest stops, writes its JUnit file and its summary."""
    tests = tmp_path / "test_slow.py"
    tests.write_text(textwrap.dedent("""
        import time

        def test_quick():
            pass

        def test_slow():
            time.sleep(120)
    """))
    monkeypatch.setattr(gpu_check, "GRACE", 3)
    limit = 9  # SIGINT after 6 s: pytest has started and passed test_quick by then
    start = time.monotonic()
    result = gpu_check.pytest_stage("cut", [str(tests)], limit, tmp_path, dict(os.environ))
    assert time.monotonic() - start < limit + 5
    assert result["status"] == "timeout" and result["passed"] == 1 and result["failed"] == 0, result
    assert result["junit"] is not None
    log = (tmp_path / "cut.log").read_text()
    assert "KeyboardInterrupt" in log and "1 passed" in log  # pytest's own summary line was written
    assert "[gpu_check] interrupted (SIGINT)" in log


def test_a_stage_that_ends_in_time_is_counted(tmp_path):
    tests = tmp_path / "test_mixed.py"
    tests.write_text("import pytest\n\ndef test_a():\n    pass\n\ndef test_b():\n    assert False\n\n"
                     "@pytest.mark.skip\ndef test_c():\n    pass\n")
    result = gpu_check.pytest_stage("mixed", [str(tests)], 60, tmp_path, dict(os.environ))
    assert (result["status"], result["passed"], result["failed"], result["skipped"]) == ("failed", 1, 1, 1)
    # (the class name holds the folder when pytest roots the run above it, as in a clone under /tmp)
    assert len(result["failures"]) == 1 and result["failures"][0].endswith("test_mixed::test_b")


def test_the_summary_is_written_after_every_stage(tmp_path, monkeypatch):
    out, export = tmp_path / "gpu-check.json", tmp_path / "export"
    seen = {}

    def first(limit, logs, env):
        seen["first"] = json.loads(out.read_text())["stages"]["first"]["status"]  # written before the stages
        return {"status": "ok"}

    def second(limit, logs, env):
        seen["second"] = json.loads((export / "gpu-check.json").read_text())["stages"]["first"]["status"]
        raise RuntimeError("a bug in a stage")

    def third(limit, logs, env):
        seen["third"] = limit
        return {"status": "timeout", "problem": "cut"}

    monkeypatch.setattr(gpu_check, "gpu_status", lambda: (True, None))
    monkeypatch.setattr(gpu_check, "SESSIONS", {1: (("first", 40, first), ("second", 40, second),
                                                    ("third", 40, third))})
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "results")  # (exported with the logs)
    code = gpu_check.main(["--out", str(out), "--logs", str(tmp_path / "logs"), "--export", str(export)])
    assert code == 1
    assert seen["first"] == "pending" and seen["second"] == "ok"  # each stage sees the ones before written
    assert seen["third"] > 100  # the time the first two did not use went on
    report = json.loads(out.read_text())
    assert {k: v["status"] for k, v in report["stages"].items()} == {"first": "ok", "second": "failed",
                                                                     "third": "timeout"}
    assert "a bug in a stage" in report["stages"]["second"]["problem"] and report["ok"] is False
    assert json.loads((export / "gpu-check.json").read_text()) == report


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="2">'
                   '<testcase classname="t" name="a"><failure/></testcase><testcase classname="t" name="b"><error/>'
                   '</testcase><testcase classname="t" name="c"/></testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 1, 2)
    assert counts["failures"] == ["t::a", "t::b"]
    assert gpu_check.junit_counts(tmp_path / "missing.xml") is None


# ===================================================================================== sanitizer logs
MEMCHECK = """\
========= COMPUTE-SANITIZER
========= Invalid __global__ write of size 4 bytes
=========     at conv2d_forward+0x2f0 in /tmp/tmpabc/kernel.cu:88
=========     by thread (3,0,0) in block (1,0,0)
=========     Address 0x7f00 is out of bounds
=========
========= Uninitialized __global__ memory read of size 4 bytes
=========     at void cub::CUB_NS::DeviceRadixSortOnesweepKernel<cub::Policy, (bool)0, int>(int *, int)+0x1a30
=========     by thread (0,0,0) in block (0,0,0)
=========
========= Invalid __global__ read of size 8 bytes
=========     at 0x000001b0 in maxpool2d_forward
=========
========= Program hit cudaErrorInvalidValue (error 1) due to "invalid argument" on CUDA API call to cudaMemcpyAsync.
=========     Saved host backtrace up to driver entry point at error
=========
========= ERROR SUMMARY: 4 errors
"""


def test_memcheck_errors_are_counted_in_gpucnn_kernels_only():
    parsed = gpu_check.parse_sanitizer_log(MEMCHECK, OWN)
    assert parsed["errors"] == 4 and parsed["own_errors"] == 2
    assert parsed["own"] == {"conv2d_forward": 1, "maxpool2d_forward": 1}
    assert len(parsed["others"]) == 2 and parsed["unattributed"] == 0
    assert any(k.startswith("void cub::") for k in parsed["others"])
    assert any(k.startswith("CUDA API: cudaErrorInvalidValue") for k in parsed["others"])
    status, problem = gpu_check.judge_sanitizer_run(parsed, {"passed": 3, "failed": 0, "errors": 0}, 0, False)
    assert status == "failed" and "conv2d_forward" in problem


def test_errors_of_other_kernels_alone_are_listed_not_failed():
    log = "\n".join(MEMCHECK.splitlines()[:1] + MEMCHECK.splitlines()[6:9] + MEMCHECK.splitlines()[13:16]
                    + ["========= ERROR SUMMARY: 2 errors"])
    parsed = gpu_check.parse_sanitizer_log(log, OWN)
    assert parsed["errors"] == 2 and parsed["own_errors"] == 0 and sum(parsed["others"].values()) == 2
    assert gpu_check.judge_sanitizer_run(parsed, {"passed": 3, "failed": 0, "errors": 0}, 0, False) == ("ok", None)


def test_a_clean_run_must_have_run_tests():
    parsed = gpu_check.parse_sanitizer_log("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n", OWN)
    assert parsed["errors"] == 0
    ok = {"passed": 5, "failed": 0, "errors": 0}
    assert gpu_check.judge_sanitizer_run(parsed, ok, 0, False) == ("ok", None)
    assert gpu_check.judge_sanitizer_run(parsed, dict(ok, passed=0), 0, False)[0] == "failed"  # a false pass
    assert gpu_check.judge_sanitizer_run(parsed, None, 1, False)[0] == "failed"
    assert gpu_check.judge_sanitizer_run(parsed, dict(ok, failed=1), 1, False)[0] == "failed"
    assert gpu_check.judge_sanitizer_run(parsed, ok, 0, True)[0] == "timeout"


def test_racecheck_hazards_are_attributed_to_their_kernel():
    log = ("========= COMPUTE-SANITIZER\n"
           "========= Error: Race reported between Write access at gather_batch+0x120 in /k.cu:60\n"
           "=========     and Read access at gather_batch+0x140 in /k.cu:61 [64 hazards]\n"
           "========= Warning: Race reported between Read access at void cub::Kernel<int>(int)+0x10\n"
           "=========     and Write access at void cub::Kernel<int>(int)+0x20 [2 hazards]\n"
           "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n")
    parsed = gpu_check.parse_sanitizer_log(log, OWN)
    assert parsed["errors"] == 1 and parsed["own"] == {"gather_batch": 1} and parsed["others"] == {}
    assert parsed["racecheck"] == {"hazards": 2, "errors": 1, "warnings": 1} and parsed["tool_error"] is None


def test_a_tool_that_refuses_the_device_is_unavailable_not_failed():
    log = ("========= COMPUTE-SANITIZER\n"
           "========= Error: Target application terminated before first instrumented API call\n"
           "========= Tracking kernels launched by child processes requires the --target-processes all option.\n")
    parsed = gpu_check.parse_sanitizer_log(log, OWN)
    assert parsed["errors"] is None and parsed["tool_error"].startswith("Error: Target application terminated")
    status, problem = gpu_check.judge_sanitizer_run(parsed, None, 255, False)
    assert status == "unavailable" and "terminated before" in problem
    crashed = gpu_check.parse_sanitizer_log("========= COMPUTE-SANITIZER\nSegmentation fault\n", OWN)
    assert gpu_check.judge_sanitizer_run(crashed, None, 139, False)[0] == "failed"  # no summary, no refusal


def test_the_positive_control_must_be_reported():
    name = gpu_check.CONTROL_KERNEL
    reported = ("========= COMPUTE-SANITIZER\ncontrol kernel launched\n"
                "========= Invalid __global__ write of size 4 bytes\n"
                f"=========     at {name}+0x90\n"
                "=========     by thread (0,0,0) in block (0,0,0)\n"
                "========= ERROR SUMMARY: 32 errors\n")
    text = reported
    assert gpu_check.judge_control(gpu_check.parse_sanitizer_log(text, OWN), text, False) == ("ok", None)
    blind = "========= COMPUTE-SANITIZER\ncontrol kernel launched\n========= ERROR SUMMARY: 0 errors\n"
    status, problem = gpu_check.judge_control(gpu_check.parse_sanitizer_log(blind, OWN), blind, False)
    assert status == "unavailable" and "not reported" in problem
    refused = "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
    status, problem = gpu_check.judge_control(gpu_check.parse_sanitizer_log(refused, OWN), refused, False)
    assert status == "unavailable" and "Device not supported" in problem
    broken = "========= COMPUTE-SANITIZER\nImportError: no cupy\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check.judge_control(gpu_check.parse_sanitizer_log(broken, OWN), broken, False)[0] == "failed"
    assert gpu_check.judge_control(gpu_check.parse_sanitizer_log(blind, OWN), blind, True)[0] == "timeout"


@pytest.mark.parametrize("location, kernel", [
    ("conv2d_forward+0x2f0 in /tmp/k.cu:88", "conv2d_forward"),
    ("conv2d_forward+0x2f0", "conv2d_forward"),
    ("0x000001b0 in conv2d_forward", "conv2d_forward"),
    ("void cub::Kernel<int, (bool)0>(int *)+0x1a30 in /usr/include/cub/x.cuh:10",
     "void cub::Kernel<int, (bool)0>(int *)"),
])
def test_report_locations_name_their_kernel(location, kernel):
    assert gpu_check.location_kernel(location) == kernel


def test_plain_names_of_cxx_kernels():
    assert gpu_check.plain_name("void cub::ns::DeviceReduceKernel<int>(int*)") == "cub::ns::DeviceReduceKernel"
    assert gpu_check.plain_name("conv2d_forward") == "conv2d_forward"


# ===================================================================================== on the CPU emulator
def _emulated(args, timeout=300):
    if shutil.which("g++") is None or not sys.platform.startswith("linux"):
        skip_kernel_check("the CPU emulator needs g++ on Linux")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT / "tests" / "emulator"), str(ROOT), str(ROOT / "benchmarks"),
                      os.environ.get("PYTHONPATH")])))
    env.pop("GPUCNN_NO_POOL", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env)


def test_every_sanitizer_selection_term_selects_a_test():
    """The -k terms of the sanitizer's selection each match a GPU test (collected on the emulator, where the
    GPU tests are not skipped), so a renamed test cannot silently shrink what the sanitizer checks."""
    from _pytest.mark.expression import Expression

    done = _emulated(["-m", "pytest", "-p", "fake_cupy", "-p", "no:cacheprovider", "--collect-only", "-q", "-m",
                      "gpu", *gpu_check.SANITIZER_FILES])
    ids = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(ids) > 600, done.stdout[-3000:] + done.stderr[-3000:]
    for term in gpu_check.SANITIZER_TESTS:
        expression = Expression.compile(term)
        chosen = [i for i in ids if expression.evaluate(lambda word, i=i: word.lower() in i.lower())]
        assert chosen, f"sanitizer term {term!r} selects no test"
        assert len(chosen) <= 12, f"sanitizer term {term!r} selects {len(chosen)} tests (a small selection)"


def test_the_preflight_runs_its_device_checks_on_the_emulator(tmp_path):
    """gpu_preflight.py on the CPU emulator: the op sweep launches every kernel, the fused kernel equals the
    pair bit for bit, the fast path's graph is captured and replayed. (Versions, NVRTC compiles, kernel
    resources and DLPack need CuPy itself and a GPU: failed here, with the reason.)"""
    out = tmp_path / "preflight.json"
    done = _emulated(["-c", "import fake_cupy, runpy, sys; sys.argv = ['gpu_preflight.py', '--out', sys.argv[1]]; "
                      "runpy.run_path('benchmarks/gpu_preflight.py', run_name='__main__')", str(out)])
    checks = json.loads(out.read_text())["checks"]
    for name in ("launches", "fused", "graph"):
        assert checks[name]["status"] == "ok", (name, checks[name], done.stdout[-2000:], done.stderr[-2000:])
    assert checks["launches"]["kernels_launched"] == len(gpu_check.own_kernels())
    assert checks["fused"]["bitwise_equal"] is True
    assert set(checks) == {"versions", "compile", "launches", "resources", "fused", "graph", "dlpack"}
    assert all(c["problem"] for c in checks.values() if c["status"] != "ok")


def test_preflight_resources_flag_a_block_larger_than_the_kernel_allows(monkeypatch):
    import types

    import gpu_preflight
    from gpucnn.engines import cuda_loader

    kernels = {"relu_forward": (512, 0), "conv2d_forward": (256, 16)}  # max threads, local bytes
    monkeypatch.setattr(cuda_loader, "_kernel_table", lambda: {k: ("x.cu", []) for k in kernels})
    monkeypatch.setattr(cuda_loader, "function", lambda name: types.SimpleNamespace(
        num_regs=64, local_size_bytes=kernels[name][1], shared_size_bytes=0, max_threads_per_block=kernels[name][0]))
    recorder = types.SimpleNamespace(blocks={"relu_forward": 256, "conv2d_forward": 1024})
    report = types.SimpleNamespace(data={})
    found = gpu_preflight.resources(report, recorder)
    assert "conv2d_forward: launched with 1024 threads, at most 256" in found["problem"]
    assert "relu_forward" not in found["problem"]
    assert any("16 bytes of local memory" in n for n in found["notes"])


def test_errors_in_gpucnn_kernels_fail_a_run_even_when_it_was_cut():
    cut = "\n".join(MEMCHECK.splitlines()[:5])  # the first report, then the stage's SIGINT: no summary
    parsed = gpu_check.parse_sanitizer_log(cut, OWN)
    assert parsed["errors"] is None and parsed["own"] == {"conv2d_forward": 1}
    assert gpu_check.judge_sanitizer_run(parsed, None, None, True)[0] == "failed"


@pytest.mark.parametrize("parts, status", [(["ok", "ok"], "ok"), (["ok", "unavailable"], "ok"),
                                            (["unavailable", "unavailable"], "unavailable"),
                                            (["timeout", "unavailable"], "timeout"), (["timeout", "failed"], "failed")])
def test_a_stage_status_from_its_parts(parts, status):
    assert gpu_check.overall_status(parts) == status
