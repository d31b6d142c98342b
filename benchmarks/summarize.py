"""Summarise the benchmark results: latest.json, summary.md and scaling.png in benchmarks/results/.

    python benchmarks/summarize.py              print the Markdown summary and write the three files
    python benchmarks/summarize.py --readme     also put the summary into benchmarks/README.md (between
                                                its "results:begin" and "results:end" marks)

Reads what the benchmarks wrote: kernels-vs-cudnn.json, training-vs-torch.json, scaling.json (GPU) and
numpy-vs-torch-cpu.json (CPU). Missing files are left out; nothing is invented. latest.json is written only
when there is at least one GPU result.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_utils  # noqa: E402  (its RESULTS is the folder used when none is given)

README = HERE / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
GPU_FILES = ("kernels-vs-cudnn", "training-vs-torch", "scaling")
PEERS = ("gpucnn", "torch_eager", "torch_compile")


def _load(folder, name):
    try:
        return json.loads((folder / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _stamp(data):
    """(date, commit) of a result file."""
    machine = (data or {}).get("machine", {})
    return machine.get("date"), machine.get("commit")


# ===================================================================================== latest.json
def _folder(folder):
    return Path(folder) if folder else bench_utils.RESULTS


def build_latest(folder=None):
    """The latest GPU run as one dict (None when there is no GPU result)."""
    folder = _folder(folder)
    parts = {name: _load(folder, name) for name in GPU_FILES}
    parts = {k: v for k, v in parts.items() if v}
    if not parts:
        return None
    newest = max(parts.values(), key=lambda d: _stamp(d)[0] or "")
    device = newest.get("device", {})
    latest = {"device": device.get("nvidia_smi_name") or device.get("name"), "date": _stamp(newest)[0],
              "commit": _stamp(newest)[1], "device_details": device,
              "sources": {name: {"date": _stamp(d)[0], "commit": _stamp(d)[1], "quick": d.get("quick")}
                          for name, d in parts.items()}}
    training = parts.get("training-vs-torch")
    if training:
        train = {}
        for who in PEERS:
            epoch = training.get("epoch", {}).get(who, {})
            five = training.get("five_epochs", {}).get(who, {})
            entry = {"epoch_seconds": epoch.get("64", {}).get("epoch_seconds"),
                     "five_epoch_seconds": five.get("five_epoch_seconds"),
                     "test_accuracy": five.get("test_accuracy")}
            for batch, values in epoch.items():
                if batch != "64" and isinstance(values, dict) and "epoch_seconds" in values:
                    entry[f"epoch_seconds_batch_{batch}"] = values["epoch_seconds"]
            error = training.get("errors", {}).get(who, {}).get("error")
            if error:
                entry["error"] = error
            train[who] = entry
        latest["train"] = train
        latest["train_targets"] = training.get("targets")
        latest["compile_mode"] = training.get("compile_mode")
    kernels = parts.get("kernels-vs-cudnn")
    if kernels:
        keep = ("layer", "pass", "batch", "ours_ms", "cudnn_ms", "peer", "ratio", "target_ratio", "met",
                "missed_by_pct", "cudnn_deterministic_ms", "ratio_vs_deterministic", "ours_gflops",
                "ours_pct_of_fp32_peak", "ours_gbs", "correct")
        latest["kernels"] = [{k: row.get(k) for k in keep if k in row} for row in kernels.get("rows", [])]
        judged = [r for r in kernels.get("rows", []) if r.get("met") is not None]
        missed = [r for r in judged if not r["met"]]
        worst = max(missed, key=lambda r: r["missed_by_pct"], default=None)
        latest["kernel_targets"] = {
            "judged": len(judged), "met": len(judged) - len(missed), "missed": len(missed),
            "worst": None if worst is None else {k: worst[k] for k in ("layer", "pass", "batch", "ratio",
                                                                       "target_ratio", "missed_by_pct")},
            "incorrect": [f"{r['layer']} {r['pass']} {r['batch']}" for r in kernels.get("rows", [])
                          if r.get("correct") is False]}
    scaling = parts.get("scaling")
    if scaling:
        latest["scaling"] = {"batch": scaling.get("batch"), "image": scaling.get("image")}
    return latest


# ===================================================================================== Markdown
def _fmt(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(latest, cpu):
    out = []
    if not latest:
        out.append("No GPU results yet.")
    if latest:
        d = latest.get("device_details", {})
        out.append(f"GPU results: **{latest['device']}** ({d.get('form_factor') or 'form factor unknown'}), "
                   f"driver {d.get('driver') or '?'}, CUDA runtime {d.get('cuda_runtime') or '?'}, "
                   f"CuPy {d.get('cupy') or '?'}, PyTorch {d.get('torch') or '?'} (cuDNN {d.get('cudnn') or '?'}); "
                   f"{latest['date']}, commit {latest['commit']}.")
        quick = [n for n, s in latest.get("sources", {}).items() if s.get("quick")]
        if quick:
            out.append(f"Quick mode (fewer repetitions and points) for: {', '.join(quick)}.")
    if latest and latest.get("train"):
        out += ["", "### Training the seed model on MNIST (FP32, same GPU, same process)", ""]
        rows = [[who, t.get("epoch_seconds"), t.get("epoch_seconds_batch_256"), t.get("five_epoch_seconds"),
                 t.get("test_accuracy"), t.get("error", "")[:80] if t.get("error") else ""]
                for who, t in latest["train"].items()]
        out.append(_table(["who", "epoch s (batch 64)", "epoch s (batch 256)", "5 epochs s", "test accuracy",
                           "note"], rows))
        targets = latest.get("train_targets") or {}
        for name, t in targets.items():
            met = t.get("met")
            out.append(f"- target {name.replace('_', ' ')} ({t.get('target')}): "
                       f"{'not measured' if met is None else 'met' if met else 'missed'}"
                       + (f"; speedup {t['speedup']}x" if t.get("speedup") is not None else "")
                       + (f", short by {t['short_by_pct']} %" if met is False and "short_by_pct" in t else "")
                       + (f", {t['seconds_over_target_pct']} % over the time" if met is False
                          and t.get("seconds_over_target_pct") else "")
                       + (f", accuracy short by {t['accuracy_short_by']}" if met is False
                          and t.get("accuracy_short_by") else ""))
    if latest and latest.get("kernels"):
        out += ["", "### Kernels against cuDNN / cuBLAS / PyTorch (GPU ms per call, FP32)", ""]
        rows = [[r["layer"], r["pass"], r["batch"], r.get("ours_ms"), r.get("cudnn_ms"),
                 r.get("cudnn_deterministic_ms"), r.get("ratio"), r.get("target_ratio"),
                 r.get("met") if r.get("met") is not None else None,
                 r.get("ours_gflops") if r.get("ours_gflops") is not None else r.get("ours_gbs")]
                for r in latest["kernels"]]
        out.append(_table(["layer", "pass", "batch", "ours ms", "peer ms", "cuDNN determ. ms", "ours/peer",
                           "target", "met", "ours GFLOP/s (pool: GB/s)"], rows))
        kt = latest.get("kernel_targets", {})
        out.append(f"- kernel targets: {kt.get('met')} of {kt.get('judged')} met"
                   + (f"; worst: {kt['worst']['layer']} {kt['worst']['pass']} at batch {kt['worst']['batch']}, "
                      f"{kt['worst']['ratio']}x vs {kt['worst']['target_ratio']}x "
                      f"(+{kt['worst']['missed_by_pct']} %)" if kt.get("worst") else "")
                   + (f"; INCORRECT: {', '.join(kt['incorrect'])}" if kt.get("incorrect") else ""))
    if latest and latest.get("scaling"):
        out += ["", "### Training throughput (images/s)", ""]
        for axis, label in (("batch", "batch (28x28)"), ("image", "image side (batch 64)")):
            points = latest["scaling"].get(axis) or {}
            keys = sorted({int(k) for who in points.values() for k in who})
            rows = [[k] + [points.get(who, {}).get(str(k), {}).get("images_per_s") for who in ("gpucnn", "torch_eager")]
                    for k in keys]
            if rows:
                out += [_table([label, "gpucnn", "torch eager"], rows), ""]
    if cpu:
        m = cpu.get("machine", {})
        out += ["", f"### CPU: NumPy engine vs PyTorch CPU ({m.get('cpu')}, {m.get('cpu_count')} cores; "
                    f"{m.get('date')}, commit {m.get('commit')})", ""]
        whos = [who for who in ("gpucnn_numpy", "gpucnn_numpy_openblas_default", "torch_cpu") if cpu.get(who)]
        rows = [[who, cpu[who].get("epoch_seconds"), cpu[who].get("train_accuracy"), cpu[who].get("openblas_kernels"),
                 cpu[who].get("ratio_over_torch")] for who in whos]
        out.append(_table(["who", "epoch s (batch 64)", "train accuracy", "OpenBLAS kernels",
                           "ratio to PyTorch (target <= 1)"], rows))
    return "\n".join(out).strip() + "\n"


# ===================================================================================== the plot
def plot_scaling(folder=None):
    """scaling.png from scaling.json: images/s against batch and against image side. Returns the path,
    or None when there is nothing to plot; raises ImportError without matplotlib."""
    folder = _folder(folder)
    data = _load(folder, "scaling")
    if not data or not (data.get("batch") or data.get("image")):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    from matplotlib.ticker import NullFormatter
    for ax, axis, label in ((axes[0], "batch", "batch size (28x28 images)"),
                            (axes[1], "image", "image side (batch 64)")):
        xs = set()
        for who, style in (("gpucnn", "o-"), ("torch_eager", "s--")):
            points = (data.get(axis) or {}).get(who, {})
            pairs = sorted((int(k), v["images_per_s"]) for k, v in points.items() if "images_per_s" in v)
            if pairs:
                ax.plot(*zip(*pairs), style, label=who.replace("_", " "))
                xs.update(k for k, _ in pairs)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs), [str(v) for v in sorted(xs)])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("training images / s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    device = (data.get("device") or {}).get("name") or "GPU"
    fig.suptitle(f"Seed-model training throughput, {device}, {_stamp(data)[0]}")
    fig.tight_layout()
    path = folder / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ===================================================================================== main
def summarize(folder=None, readme=False, quiet=False):
    folder = _folder(folder)
    latest = build_latest(folder)
    cpu = _load(folder, "numpy-vs-torch-cpu")
    text = markdown(latest, cpu)
    if latest:
        (folder / "latest.json").write_text(json.dumps(latest, indent=2) + "\n")
    if latest or cpu:  # nothing measured, nothing written
        header = f"# Benchmark summary\n\n_Written by benchmarks/summarize.py on {datetime.date.today()}._\n\n"
        (folder / "summary.md").write_text(header + text)
    try:
        plot_scaling(folder)
    except ImportError as exc:
        if not quiet:
            print(f"(no scaling plot: {exc})", file=sys.stderr)
    if readme:
        doc = README.read_text()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            README.write_text(head + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
        else:
            print(f"{README} has no {BEGIN} ... {END} block; not updated", file=sys.stderr)
    if not quiet:
        print(text)
    return latest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=None, help="folder of the result JSONs (default benchmarks/results)")
    parser.add_argument("--readme", action="store_true", help="also update benchmarks/README.md")
    args = parser.parse_args(argv)
    summarize(args.results, readme=args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
