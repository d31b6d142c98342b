"""Pre-flight of gpu_check.py (about 30 s on a GPU): is the machine as gpucnn expects, before any test runs?

    python3 benchmarks/gpu_preflight.py --out preflight.json

Checks, in order, each recorded in the JSON file as it finishes (a run cut at its limit keeps the ones done):

  versions   Python, NumPy, CuPy, the CUDA driver and runtime, NVRTC, the device; the CUDA folder CuPy uses
             and whether its include folder holds the CUDA headers; ``cupy.show_config()``
  compile    every kernels/*.cu compiled through gpucnn's loader (NVRTC), the seconds each took
  launches   every CUDA op once on small shapes, and two fast-path epochs (sparse labels, Adam, dropout;
             one-hot labels, RMSprop), recording each kernel's launch blocks
  resources  each kernel's registers, local memory (spills) and max threads per block, against the largest
             block it was launched with
  fused      conv2d_maxpool_forward against conv2d_forward + maxpool2d_forward on the seed model's second
             layer: the same bits
  graph      a fast-path step captured with every allocation refused, replayed; the allocator, the garbage
             collector and the stream back to normal after it
  dlpack     a CuPy array to PyTorch and back through DLPack, the same memory both ways

Exit status 0 when every check passed, 1 otherwise.
"""
import argparse
import contextlib
import gc
import io
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class Report:
    """The JSON report, written again after every check."""

    def __init__(self, path):
        self.path, self.data = Path(path), {"device": None, "versions": {}, "checks": {}}
        self.write()

    def write(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")

    def check(self, name, fn):
        """Run ``fn()`` (returns details, or raises): recorded as ok, or failed with the error."""
        start = time.monotonic()
        try:
            details = fn() or {}
            problem = details.pop("problem", None)
            entry = {"status": "failed" if problem else "ok", "problem": problem, **details}
        except Exception as exc:
            entry = {"status": "failed", "problem": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.monotonic() - start, 2)
        self.data["checks"][name] = entry
        self.write()
        print(f"preflight: {name:9} {entry['status']:6} {entry['seconds']:6.2f} s"
              + (f"  {entry['problem']}" if entry["problem"] else ""), flush=True)
        return entry


# ===================================================================================== checks
def versions(report):
    import cupy

    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    name = props.get("name", b"")
    name = name.decode() if isinstance(name, bytes) else str(name)
    report.data["device"] = name
    found = {"python": platform.python_version(), "numpy": np.__version__, "cupy": cupy.__version__,
             "cuda_driver": rt.driverGetVersion(), "cuda_runtime": rt.runtimeGetVersion(),
             "device": name, "compute_capability": f"{props.get('major')}.{props.get('minor')}",
             "multiprocessors": props.get("multiProcessorCount")}
    try:
        found["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as exc:
        found["nvrtc"] = f"unknown ({type(exc).__name__}: {exc})"
    cuda_path = cupy.cuda.get_cuda_path()
    include = Path(cuda_path or "/nonexistent") / "include"
    found.update(cuda_path=cuda_path, cuda_include=str(include),
                 cuda_headers=(include / "cuda_fp16.h").is_file() and (include / "cuda_runtime.h").is_file())
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            cupy.show_config()
        except Exception as exc:
            print(f"cupy.show_config() failed: {type(exc).__name__}: {exc}")
    found["cupy_config"] = text.getvalue().splitlines()
    report.data["versions"] = found
    problem = None if found["cuda_headers"] else (
        f"no CUDA headers under {include}: CuPy's own kernels (elementwise, reductions) may not compile")
    return {"problem": problem, "device": name, "nvrtc": found["nvrtc"], "cuda_path": cuda_path}


def compile_all():
    from gpucnn.engines import cuda_loader

    seconds, failed = {}, {}
    for filename in cuda_loader.kernel_files():
        start = time.monotonic()
        try:
            cuda_loader.module(filename)
            for name, (source, _) in cuda_loader._kernel_table().items():
                if source == filename:
                    cuda_loader.function(name)
        except Exception as exc:
            failed[filename] = f"{type(exc).__name__}: {str(exc)[-800:]}"
        seconds[filename] = round(time.monotonic() - start, 2)
    return {"seconds": seconds, "problem": f"{len(failed)} files do not compile: {failed}" if failed else None}


class LaunchRecorder:
    """Wraps gpucnn's ``cuda_loader.launch``: the largest block (threads) each kernel was launched with."""

    def __init__(self):
        from gpucnn.engines import cuda_loader

        self.loader, self.original, self.blocks = cuda_loader, cuda_loader.launch, {}

    def __enter__(self):
        def launch(name, grid, block, args, shared_mem=0):
            dims = cuda_loader_dims(block)
            self.blocks[name] = max(self.blocks.get(name, 0), dims[0] * dims[1] * dims[2])
            return self.original(name, grid, block, args, shared_mem)
        self.loader.launch = launch
        return self

    def __exit__(self, *exc):
        self.loader.launch = self.original


def cuda_loader_dims(block):
    dims = tuple(int(v) for v in (block if isinstance(block, (tuple, list)) else (block,)))
    return dims + (1,) * (3 - len(dims))


def every_op():
    """Each CUDA op once, on small shapes."""
    import cupy

    from gpucnn.engines import cuda_ops as ops

    rng = np.random.default_rng(0)

    def f32(*shape):
        return cupy.asarray(rng.standard_normal(shape).astype(np.float32))

    valid, one = (0, 0, 0, 0), (1, 1)
    x, w, b = f32(4, 12, 12, 3), f32(3, 3, 3, 8), f32(8)
    ctx = {}
    y = ops.conv2d_forward(x, w, b, one, valid, "relu", ctx)
    ops.conv2d_backward_data(y, w, x.shape, one, valid, ctx)
    ops.conv2d_backward_filter(y, x, w.shape, one, valid, ctx)
    pooled, idx = ops.maxpool2d_forward(y, (2, 2), (2, 2), valid)
    ops.maxpool2d_backward(pooled, idx, y.shape, (2, 2), (2, 2), valid)
    ops.avgpool2d_backward(ops.avgpool2d_forward(y, (2, 2), (2, 2), valid), y.shape, (2, 2), (2, 2), valid)
    ops.global_avgpool2d_backward(ops.global_avgpool2d_forward(y), y.shape)
    fused, fidx = ops.conv2d_maxpool_forward(x, w, b, one, valid, "relu", ctx={})
    ops.conv2d_maxpool_backward(fused, fused, fidx, x, w, one, valid, "relu", ctx={})
    h = fused.reshape(fused.shape[0], -1)
    wd = f32(h.shape[1], 5)
    p = ops.dense_forward(h, wd, f32(5), "softmax")
    ops.dense_backward_data(p, wd)
    ops.dense_backward_weights(p, h)
    for name in ("relu", "softmax", "sigmoid", "gelu"):
        act = ops.activation_forward(h, name)
        ops.activation_backward(act, act, name, x=h)
    seeds, counter = cupy.asarray(np.array([[1]], np.uint64)), cupy.zeros(1, np.int32)
    ops.dropout_backward(*ops.dropout_forward(h, 0.5, seeds, counter, 0))
    for sparse, labels in ((True, cupy.asarray(np.arange(4, dtype=np.int32))),
                           (False, cupy.asarray(np.eye(5, dtype=np.float32)[:4]))):
        for from_logits in (False, True):
            ops.crossentropy_forward(p, labels, sparse, from_logits)
            ops.crossentropy_backward(p, labels, sparse, from_logits)
        ops.softmax_crossentropy_backward(p, labels, sparse)
        ops.count_correct(p, labels, sparse)
    q, t = ops.activation_forward(p[:, :1], "sigmoid"), cupy.asarray(np.array([[0], [1], [1], [0]], np.float32))
    ops.binary_crossentropy_forward(q, t, False)
    ops.binary_crossentropy_backward(q, t, False)
    ops.sigmoid_binary_crossentropy_backward(q, t)
    ops.count_binary_correct(q, t)
    ops.split(ops.add(*ops.split(ops.concat([h, h], 1), [h.shape[1]] * 2, 1)), [1, h.shape[1] - 1], 1)
    gamma, beta, mean, var = f32(8), f32(8), cupy.zeros(8, np.float32), cupy.ones(8, np.float32)
    bn, batch_mean, inv_std = ops.batchnorm_forward_training(y, gamma, beta, mean, var, 0.99, 1e-3)
    ops.batchnorm_backward(bn, y, gamma, batch_mean, inv_std, True)
    ops.batchnorm_forward_inference(y, gamma, beta, mean, var, 1e-3)
    ops.batchnorm_fold(f32(3, 3, 4, 8), f32(8), gamma, beta, mean, var, 1e-3)
    dw_shape = (3, 3, 8, 2)
    dwy = ops.depthwise_conv2d_forward(y, f32(*dw_shape), f32(16), one, valid, "relu")
    ops.depthwise_conv2d_backward_data(dwy, f32(*dw_shape), y.shape, one, valid)
    ops.depthwise_conv2d_backward_filter(dwy, y, dw_shape, one, valid)
    gm, gidx = ops.global_maxpool2d_forward(y)
    ops.global_maxpool2d_backward(gm, gidx, y.shape)
    ops.zero_padding2d_backward(ops.zero_padding2d_forward(y, (1, 1, 1, 1)), y.shape, (1, 1, 1, 1))
    images = f32(4, 12, 12, 3)
    flags = cupy.asarray(np.array([1, 0, 1, 0], np.bool_))
    ops.flip(ops.rescale(images, 1 / 255, 0.0), flags, flags)
    table = cupy.asarray(ops.rotation_transforms(np.array([0.1, -0.2, 0.3, 0.0] * 2), 12, 12)).reshape(2, 4, 8)
    transforms = ops.step_row(table, counter, 4)  # the augmentation layers' row of a step
    ops.affine_transform(images, transforms)
    ops.adjust_contrast(images, cupy.asarray(np.array([0.5, 1.0, 1.5, 2.0], np.float32)))
    wv, gv = f32(100), f32(100)
    zero = lambda: cupy.zeros(100, np.float32)  # noqa: E731
    rates = cupy.asarray(np.array([0.01], np.float32))
    ops.sgd_update(wv, gv, zero(), rates, counter, 0.9, True)
    ops.rmsprop_update(wv, gv, zero(), zero(), zero(), rates, counter, 0.9, 1e-7, 0.5, True)
    ops.adam_update(wv, gv, zero(), zero(), rates, counter, 0.9, 0.999, 1e-7)
    ops.weight_decay(wv, rates, counter)
    cupy.cuda.Device().synchronize()


def small_model(optimizer, loss, dropout):
    from gpucnn import layers, models

    model = models.Sequential([layers.Conv2D(4, (3, 3), activation="relu", input_shape=(10, 10, 1)),
                               layers.MaxPooling2D((2, 2)), layers.Conv2D(6, (2, 2), activation="relu"),
                               layers.Flatten(), layers.Dense(8, activation="relu")]
                              + ([layers.Dropout(0.3)] if dropout else [])
                              + [layers.Dense(1, activation="sigmoid") if loss == "binary_crossentropy"
                                 else layers.Dense(5, activation="softmax")])
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return model


def fast_path_epoch(optimizer, loss, dropout):
    """A fast-path Trainer over 40 small images at batch 16: its graphs captured (every allocation refused
    inside) and one epoch replayed. Returns the trainer."""
    import cupy

    from gpucnn import backend
    from gpucnn.models import fastpath

    backend.set_engine("gpu")
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 256, size=(40, 10, 10, 1)) / 255).astype(np.float32)
    labels = rng.integers(0, 5, size=40)
    y = labels if loss.startswith("sparse") else np.eye(5, dtype=np.float32)[labels]
    if loss == "binary_crossentropy":
        y = (labels % 2).astype(np.float32)[:, None]
    trainer = fastpath.plan(small_model(optimizer, loss, dropout), 16, x, y)
    if isinstance(trainer, str):
        raise RuntimeError(f"the fast path was not taken: {trainer}")
    trainer.begin_epoch(shuffle=True)
    for step in range(trainer.steps):
        trainer.graph_for(step).launch(trainer.stream)
    trainer.stream.synchronize()
    cupy.cuda.Device().synchronize()
    return trainer


def launches(recorder):
    with recorder:
        every_op()
        fast_path_epoch("adam", "sparse_categorical_crossentropy", dropout=True)
        fast_path_epoch("rmsprop", "categorical_crossentropy", dropout=False)
        fast_path_epoch("sgd", "binary_crossentropy", dropout=False)
    return {"kernels_launched": len(recorder.blocks)}


def resources(report, recorder):
    from gpucnn.engines import cuda_loader

    table, rows, problems, notes = cuda_loader._kernel_table(), {}, [], []
    for name in sorted(table):
        kernel = cuda_loader.function(name)
        row = {"registers": kernel.num_regs, "local_bytes": kernel.local_size_bytes,
               "static_shared_bytes": kernel.shared_size_bytes, "max_threads": kernel.max_threads_per_block,
               "launched_block": recorder.blocks.get(name)}
        rows[name] = row
        if row["launched_block"] is None:
            notes.append(f"{name} not launched in the pre-flight")
        elif row["launched_block"] > row["max_threads"]:
            problems.append(f"{name}: launched with {row['launched_block']} threads, at most {row['max_threads']} "
                            f"with {row['registers']} registers")
        if row["local_bytes"]:
            notes.append(f"{name}: {row['local_bytes']} bytes of local memory (spills or a local array)")
    report.data["resources"] = rows
    report.data["resources_summary"] = {"kernels": len(rows), "problems": problems, "notes": notes}
    return {"problem": "; ".join(problems) or None, "notes": notes}


def fused():
    """The seed model's second convolution with its pool, fused and unfused, at batch 64: the same bits."""
    import cupy

    from gpucnn.engines import cuda_ops as ops

    rng = np.random.default_rng(2)
    x = cupy.asarray(rng.standard_normal((64, 13, 13, 32)).astype(np.float32))
    w = cupy.asarray((rng.standard_normal((3, 3, 32, 64)) * 0.1).astype(np.float32))
    b = cupy.asarray(rng.standard_normal(64).astype(np.float32))
    valid = (0, 0, 0, 0)
    y, idx = ops.conv2d_maxpool_forward(x, w, b, (1, 1), valid, "relu", ctx={})
    z = ops.conv2d_forward(x, w, b, (1, 1), valid, "relu")
    y2, idx2 = ops.maxpool2d_forward(z, (2, 2), (2, 2), valid)
    y, y2, idx, idx2 = (a.get() for a in (y, y2, idx, idx2))
    same = bool(np.array_equal(y.view(np.uint32), y2.view(np.uint32)) and np.array_equal(idx, idx2))
    diff = float(np.max(np.abs(y - y2)))
    return {"bitwise_equal": same, "max_abs_difference": diff,
            "problem": None if same else f"the fused kernel differs from the pair (max |diff| {diff:g})"}


def graph():
    import cupy

    allocator = cupy.cuda.get_allocator()
    trainer = fast_path_epoch("adam", "sparse_categorical_crossentropy", dropout=True)
    steps = int(trainer.step.get(stream=trainer.stream)[0])
    losses = trainer.loss_steps.get(stream=trainer.stream)
    problems = []
    if steps != trainer.steps:
        problems.append(f"the step counter reads {steps} after {trainer.steps} replayed steps")
    if not np.isfinite(losses).all():
        problems.append(f"non-finite step losses {losses.tolist()}")
    if cupy.cuda.get_allocator() != allocator or not gc.isenabled() or trainer.stream.is_capturing():
        problems.append("the allocator, the garbage collector or the stream was not restored after the capture")
    return {"graphs": sorted(trainer._graphs), "steps": steps, "problem": "; ".join(problems) or None}


def dlpack():
    import cupy
    import torch

    a = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    t = torch.from_dlpack(a)
    t.add_(1)  # in place, on the CuPy array's memory
    back = cupy.from_dlpack(t)
    torch.cuda.synchronize()
    same_memory = t.data_ptr() == a.data.ptr == back.data.ptr
    values = bool((a.get() == np.arange(1, 13, dtype=np.float32).reshape(3, 4)).all())
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "same_memory": same_memory,
            "values": values, "problem": None if same_memory and values else
            f"DLPack round trip: same memory {same_memory}, values {values}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description="gpu_check.py's pre-flight")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "logs" / "preflight.json"))
    args = parser.parse_args(argv)
    report = Report(args.out)
    recorder = LaunchRecorder()
    report.check("versions", lambda: versions(report))
    report.check("compile", compile_all)
    report.check("launches", lambda: launches(recorder))
    report.check("resources", lambda: resources(report, recorder))
    report.check("fused", fused)
    report.check("graph", graph)
    report.check("dlpack", dlpack)
    bad = [k for k, v in report.data["checks"].items() if v["status"] != "ok"]
    print(f"preflight: {'every check passed' if not bad else 'failed: ' + ', '.join(bad)}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("GPUCNN_FASTPATH", "1")
    sys.exit(main())
