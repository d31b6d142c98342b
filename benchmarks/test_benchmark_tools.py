"""The benchmark suite's own tools, checked on any machine (no GPU, no timing): summarize.py on results written
here. Not benchmarks: ``--benchmark-only`` skips them. gpu_check.py's own tests are tests/test_gpu_check.py
(run by ``make test`` and CI)."""
import json

import summarize
from bench_utils import take_turns

HERE = Path(__file__).resolve().parent


def test_sanitizer_summaries_are_counted():
    memcheck = "========= COMPUTE-SANITIZER\n...\n========= ERROR SUMMARY: 3 errors\n"
    assert gpu_check.parse_sanitizer_log(memcheck) == (3, None)
    race = ("========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n"
            "========= ERROR SUMMARY: 1 error\n")
    assert gpu_check.parse_sanitizer_log(race) == (1, {"hazards": 2, "errors": 1, "warnings": 1})
    assert gpu_check.parse_sanitizer_log("========= ERROR SUMMARY: 0 errors\n") == (0, None)
    clean_race = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    assert gpu_check.parse_sanitizer_log(clean_race) == (0, {"hazards": 0, "errors": 0, "warnings": 0})
    assert gpu_check.parse_sanitizer_log("Target application terminated before first instrumented API call")[0] is None


def test_the_cpu_configurations_take_turns_round_after_round():
    calls = []
    runs = take_turns([("a", "torch", {"K": "1"}), ("b", "gpucnn", {})], 2,
                      lambda who, env: calls.append(who) or len(calls))
    assert calls == ["torch", "gpucnn", "torch", "gpucnn"]
    assert runs == {"a": [1, 3], "b": [2, 4]}


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="1" skipped="2">'
                   '<testcase classname="t" name="a"><failure/></testcase><testcase classname="t" name="b"><error/>'
                   '</testcase><testcase classname="t" name="c"/></testsuite></testsuites>')
    counts = gpu_check.junit_counts(xml)
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (1, 1, 1, 2)
    assert counts["failures"] == ["t::a", "t::b"]
    assert gpu_check.junit_counts(tmp_path / "missing.xml") is None


def _write(folder, name, data):
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_summary_reports_targets_and_writes_nothing_without_results(tmp_path):
    assert summarize.summarize(tmp_path, quiet=True) is None
    assert list(tmp_path.iterdir()) == []  # no results: no files
    stamp = {"machine": {"date": "2000-01-01", "commit": "abc"}, "device": {"name": "Test GPU"}}
    _write(tmp_path, "kernels-vs-cudnn", {**stamp, "rows": [
        {"layer": "conv2", "pass": "forward", "batch": 64, "ours_ms": 2.0, "cudnn_ms": 1.0, "ratio": 2.0,
         "target_ratio": 1.0, "met": False, "missed_by_pct": 100.0, "correct": True},
        {"layer": "conv2", "pass": "forward", "batch": 256, "ours_ms": 1.0, "cudnn_ms": 1.0, "ratio": 1.0,
         "target_ratio": None, "met": None, "missed_by_pct": None, "correct": True}]})
    _write(tmp_path, "training-vs-torch", {**stamp, "epoch": {"gpucnn": {"64": {"epoch_seconds": 1.5}}},
                                           "five_epochs": {"gpucnn": {"five_epoch_seconds": 9.0,
                                                                      "test_accuracy": 0.99}},
                                           "errors": {"torch_compile": {"error": "no compiler"}}})
    latest = summarize.summarize(tmp_path, quiet=True)
    assert latest["device"] == "Test GPU" and latest["commit"] == "abc" and latest["date"] == "2000-01-01"
    assert latest["train"]["gpucnn"] == {"epoch_seconds": 1.5, "five_epoch_seconds": 9.0, "test_accuracy": 0.99}
    assert latest["train"]["torch_compile"]["error"] == "no compiler"
    assert latest["kernel_targets"]["judged"] == 1 and latest["kernel_targets"]["missed"] == 1
    assert [set(k) >= {"layer", "pass", "batch", "ours_ms", "cudnn_ms"} for k in latest["kernels"]] == [True, True]
    assert json.loads((tmp_path / "latest.json").read_text()) == latest
    text = (tmp_path / "summary.md").read_text()
    assert "Test GPU" in text and "| conv2 | forward | 64 |" in text and "0 of 1 met" in text
