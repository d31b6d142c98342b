"""The benchmark suite's own tools, checked on any machine (no GPU, no timing): summarize.py on results written
here, the CPU comparisons' configurations. Not benchmarks: ``make test`` runs them (a pytest session of their own),
``--benchmark-only`` skips them. gpu_check.py's own tests are tests/test_gpu_check.py."""
import json

import summarize
from bench_utils import take_turns
from test_catsdogs_numpy_vs_torch_cpu import STEPS_OF, child
from test_numpy_vs_torch_cpu import configurations



def test_the_cpu_configurations_take_turns_round_after_round():
    calls = []
    runs = take_turns([("a", "torch", {"K": "1"}), ("b", "gpucnn", {})], 2,
                      lambda who, env: calls.append(who) or len(calls))
    assert calls == ["torch", "gpucnn", "torch", "gpucnn"]
    assert runs == {"a": [1, 3], "b": [2, 4]}


def test_the_catsdogs_benchmark_measures_only_what_it_names(capsys):
    """Each of its configurations runs the steps its name says: not the seed benchmark's functional variant
    (which once ran PyTorch's steps under gpucnn's name)."""
    import pytest

    names = [c for c in configurations() if c[1] in STEPS_OF]
    assert {who for _, who, _ in names} == {"gpucnn", "torch"}
    with pytest.raises(SystemExit, match="unknown configuration 'gpucnn_functional'"):
        child("gpucnn_functional")


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
