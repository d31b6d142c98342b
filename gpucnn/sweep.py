"""The seed exercise: train variants of the seed convnet on a small MNIST training set and compare them on
held-out images.

Training uses the first ``train_size`` images of MNIST's training set; validation uses its last
``val_size`` images (by default 50,000–59,999), which never overlap the training images for
``train_size <= 50,000``. The test set is left untouched for a final evaluation.

    from gpucnn.sweep import run_sweep
    results = run_sweep()          # prints a table, returns a list of dicts
"""
import time

import numpy as np

# name, filters per conv block, kernel size, pooling between blocks ("max", "avg" or None), and the
# width of the Dense layer (64 unless given; "wide" is the seed notebooks' 64/64/128 + Dense(128) variant)
DEFAULT_VARIANTS = [
    {"name": "seed", "filters": (32, 64, 64), "kernel_size": 3, "pooling": "max"},
    {"name": "no pooling", "filters": (32, 64, 64), "kernel_size": 3, "pooling": None},
    {"name": "avg pooling", "filters": (32, 64, 64), "kernel_size": 3, "pooling": "avg"},
    {"name": "2 blocks", "filters": (32, 64), "kernel_size": 3, "pooling": "max"},
    {"name": "2 blocks, 5x5", "filters": (32, 64), "kernel_size": 5, "pooling": "max"},
    {"name": "narrow", "filters": (16, 32, 32), "kernel_size": 3, "pooling": "max"},
    {"name": "wide", "filters": (64, 64, 128), "kernel_size": 3, "pooling": "max", "dense": 128},
]
QUICK_VARIANTS = [v for v in DEFAULT_VARIANTS if v["name"] in ("seed", "no pooling", "2 blocks")]
_COLUMNS = ("name", "blocks", "filters", "kernel_size", "pooling", "params", "val_accuracy",
            "val_loss", "seconds")


def build_variant(filters=(32, 64, 64), kernel_size=3, pooling="max", dense=64, input_shape=(28, 28, 1),
                  classes=10):
    """The seed model's layout with other choices: a ReLU convolution per entry of ``filters``, a 2x2
    pooling layer between consecutive convolutions (``pooling=None``: none, as the book's
    ``model_no_max_pool``), then Flatten, Dense(``dense``, relu) and a softmax over ``classes``."""
    from . import layers, models
    pools = {"max": layers.MaxPooling2D, "avg": layers.AveragePooling2D, None: None}
    if pooling not in pools:
        raise ValueError(f"pooling must be 'max', 'avg' or None, got {pooling!r}")
    model = models.Sequential([layers.Input(shape=input_shape)])
    for i, f in enumerate(filters):
        if i and pooling:
            model.add(pools[pooling]((2, 2)))
        model.add(layers.Conv2D(f, kernel_size, activation="relu"))
    model.add(layers.Flatten())
    model.add(layers.Dense(dense, activation="relu"))
    model.add(layers.Dense(classes, activation="softmax"))
    return model


def run_sweep(variants=None, train_size=6000, val_size=10000, epochs=3, batch_size=64, seed=0,
              verbose=1, data=None):
    """Train each variant (dicts like ``DEFAULT_VARIANTS``; missing keys take the seed model's values)
    with RMSprop, from the same seed, and return one dict per variant: name, blocks, filters,
    kernel_size, pooling, dense, params, val_accuracy, val_loss, train_accuracy, seconds.

    ``data``: ``(x, y)`` to use instead of MNIST's training set (images (N, H, W, C) in [0, 1], one-hot
    labels); the first ``train_size`` samples train, the last ``val_size`` validate. ``verbose``: 0
    silent, 1 a line per variant and the final table, 2 also Keras's per-epoch lines.
    """
    from . import utils
    if data is None:
        from .examples import load_mnist
        data = load_mnist()[0]
    x, y = data
    if train_size < 1 or val_size < 1:
        raise ValueError(f"train_size and val_size must be positive, got {train_size} and {val_size}")
    if train_size + val_size > len(x):
        raise ValueError(f"train_size + val_size = {train_size + val_size} exceeds the {len(x)} "
                         "samples available")
    x_train, y_train = x[:train_size], y[:train_size]
    x_val, y_val = x[len(x) - val_size:], y[len(x) - val_size:]
    if verbose:
        print(f"sweep: training on samples 0-{train_size - 1}, validating on "
              f"{len(x) - val_size}-{len(x) - 1} (epochs {epochs}, batch {batch_size}, seed {seed})")
    results = []
    for spec in variants or DEFAULT_VARIANTS:
        spec = {**DEFAULT_VARIANTS[0], **spec}
        utils.set_random_seed(seed)
        model = build_variant(spec["filters"], spec["kernel_size"], spec["pooling"],
                              spec.get("dense", 64), x.shape[1:], y.shape[1])
        model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
        start = time.perf_counter()
        history = model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size,
                            verbose=2 if verbose > 1 else 0)
        seconds = time.perf_counter() - start
        val_loss, val_acc = model.evaluate(x_val, y_val, batch_size=256, verbose=0)
        results.append({
            "name": spec["name"], "blocks": len(spec["filters"]), "filters": list(spec["filters"]),
            "kernel_size": spec["kernel_size"], "pooling": spec["pooling"] or "none",
            "dense": spec.get("dense", 64), "params": model.count_params(), "val_accuracy": val_acc,
            "val_loss": val_loss,
            "train_accuracy": history.history["accuracy"][-1], "seconds": round(seconds, 2)})
        if verbose:
            r = results[-1]
            print(f"  {r['name']}: val_accuracy {val_acc:.4f}, val_loss {val_loss:.4f}, "
                  f"{r['params']:,} params, {seconds:.1f} s")
    if verbose:
        print(format_table(results))
    return results


def format_table(results):
    """The results as an aligned text table (best validation accuracy marked with *)."""
    best = int(np.argmax([r["val_accuracy"] for r in results])) if results else -1

    def cells(r):
        return [r["name"], str(r["blocks"]), "-".join(map(str, r["filters"])),
                f"{r['kernel_size']}x{r['kernel_size']}", r["pooling"], f"{r['params']:,}",
                f"{r['val_accuracy']:.4f}", f"{r['val_loss']:.4f}", f"{r['seconds']:.1f}"]

    rows = [list(_COLUMNS)] + [cells(r) for r in results]
    rows[1 + best][0] += " *" if best >= 0 else ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
