"""Pictures of what a model learned: feature maps, filters, training curves, errors, sweeps.

Every function returns a matplotlib ``Figure`` and, given ``path``, also writes it as a PNG. Figures are
drawn with the Agg canvas (no display and no pyplot state), so they work on servers and in notebooks
(a returned Figure displays itself in Jupyter). Needs matplotlib: ``pip install matplotlib`` (from a clone of
gpucnn: ``pip install -e '.[viz]'``).
"""
import math

import numpy as np

DPI = 100


def _matplotlib():
    """Import matplotlib's Figure and Agg canvas, or say how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("gpucnn.viz draws with matplotlib, which is not installed: pip install matplotlib "
                          "(from a clone of gpucnn: pip install -e '.[viz]')") from exc
    return Figure, FigureCanvasAgg


def _figure(width, height):
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig, path):
    if path is not None:
        fig.savefig(path, dpi=DPI, format="png")
    return fig


def _labels(y):
    """Class indices from integer labels (N,) or one-hot rows (N, classes)."""
    y = np.asarray(y)
    return y.argmax(axis=1) if y.ndim == 2 and y.shape[1] > 1 else y.reshape(len(y)).astype(int)


def _show_image(ax, img, **kwargs):
    """Draw one (H, W, C) image (C = 1: grayscale) without axes."""
    img = np.asarray(img)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    ax.imshow(img, cmap=kwargs.pop("cmap", "gray") if img.ndim == 2 else None,
              interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


# ===================================================================================== looking inside
def _image_layers(model):
    """The names of the layers whose outputs are images (convolutions, poolings, ...); not the input itself (a
    functional model lists its InputLayer among its layers, as Keras does)."""
    from .layers import InputLayer

    def per_sample(shape):  # (a nested model's output_shape starts with the batch axis, None; a layer's does not)
        return tuple(shape)[1:] if shape and tuple(shape)[0] is None else tuple(shape)
    return [l.name for l in model.layers if not isinstance(l, InputLayer) and len(per_sample(l.output_shape)) == 3]


def plot_feature_maps(model, image, layers=None, path=None, cols=16):
    """One figure: the input digit, then for each layer every channel's response to it.

    ``image`` is one sample (H, W, C) (or (1, H, W, C)); ``layers`` names the layers to show (default:
    every layer whose output is still an image: convolutions and poolings). Each map is scaled to its own
    range (bright = strong response); a map dark all over is a channel this image leaves at 0.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim == 2:  # (H, W): a grayscale image without its channel axis
        x = x[..., None]
    if x.ndim == 3:
        x = x[None]
    if layers is None:
        model._require_built("plot_feature_maps")
        layers = _image_layers(model)
        if not layers:
            raise ValueError("the model has no layer with image-shaped outputs to show")
    outputs = model.layer_outputs(x, layers)
    flat = [n for n, a in outputs.items() if a.ndim != 4]
    if flat:
        raise ValueError(f"layer {flat[0]!r} outputs a flat vector, not feature maps; choose among "
                         f"{_image_layers(model)}")
    cols = max(4, min(cols, max(a.shape[-1] for a in outputs.values())))
    rows = [math.ceil(a.shape[-1] / cols) for a in outputs.values()]
    cell = max(0.8, 4.8 / cols)  # room for the titles when there are few maps
    fig = _figure(cols * cell, (sum(rows) + 2.4) * cell + 0.45 * len(rows))
    subs = fig.subfigures(len(rows) + 1, 1, height_ratios=[2.4 * cell] + [r * cell + 0.45 for r in rows])
    ax = subs[0].add_axes((0.5 - 1.9 / (cols * cell) / 2, 0.04, 1.9 / (cols * cell), 0.8))
    _show_image(ax, x[0])
    ax.set_title("input", fontsize=10)
    for sub, (name, maps), r in zip(subs[1:], outputs.items(), rows):
        layer = model.get_layer(name)
        h, w, c = maps.shape[1:]
        sub.suptitle(f"{name} ({type(layer).__name__}): {c} maps of {h}×{w}", fontsize=10, y=0.99)
        axes = sub.subplots(r, cols, squeeze=False, gridspec_kw={
            "wspace": 0.06, "hspace": 0.06, "left": 0.01, "right": 0.99, "bottom": 0.02,
            "top": 1 - 0.4 / (r * cell + 0.45)})
        for i, ax in enumerate(axes.flat):
            if i < c:
                _show_image(ax, maps[0, :, :, i], cmap="viridis")
            else:
                ax.set_axis_off()
    return _finish(fig, path)


def plot_filters(model, path=None, cols=8):
    """The first convolution's kernels as small images, on one shared colour scale (red +, blue −).

    Kernels over 3 input channels are drawn in colour; over 1 channel in the diverging map; over any
    other number, each kernel is averaged over its input channels.
    """
    model._require_built("plot_filters")
    conv = next((l for l in model.layers if type(l).__name__ == "Conv2D"), None)
    if conv is None:
        raise ValueError("the model has no Conv2D layer whose filters could be shown")
    kernel = conv.get_weights()[0]  # (kh, kw, in, filters)
    kh, kw, cin, n = kernel.shape
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    width, height = max(cols * 1.0 + 0.9, 4.0), rows * 1.0 + 0.7
    fig = _figure(width, height)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={
        "left": 0.02, "right": 1 - 0.9 / width, "bottom": 0.02, "top": 1 - 0.6 / height,
        "wspace": 0.1, "hspace": 0.1})
    scale = float(np.abs(kernel).max()) or 1.0
    image = None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_axis_off()
            continue
        k = kernel[:, :, :, i]
        if cin == 3:
            _show_image(ax, np.clip(0.5 + 0.5 * k / scale, 0, 1))
        else:
            image = ax.imshow(k.mean(axis=2), cmap="RdBu_r", vmin=-scale, vmax=scale,
                              interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    if image is not None:
        cax = fig.add_axes((1 - 0.75 / width, 0.1, 0.15 / width, 0.75))
        fig.colorbar(image, cax=cax)
    how = "" if cin in (1, 3) else f" (mean over {cin} input channels)"
    fig.suptitle(f"{conv.name}: {n} filters of {kh}×{kw}×{cin}{how}", fontsize=11)
    return _finish(fig, path)


# ===================================================================================== training
def plot_history(history, path=None):
    """Loss and accuracy per epoch, training (solid) and validation (dashed).

    ``history`` is what ``fit`` returns (a ``History``) or its ``.history`` dict.
    """
    logs = getattr(history, "history", history)
    if not isinstance(logs, dict) or not logs.get("loss"):
        raise ValueError("plot_history needs fit()'s History (or its .history dict) with a 'loss' list")
    first = getattr(history, "epoch", None) or [0]
    epochs = np.arange(len(logs["loss"])) + first[0] + 1
    panels = [k for k in ("loss", "accuracy") if k in logs]
    fig = _figure(5.0 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, key in zip(axes, panels):
        ax.plot(epochs, logs[key], "o-", color="C0", label=f"training {key}")
        if f"val_{key}" in logs:
            ax.plot(epochs, logs[f"val_{key}"], "s--", color="C1", label=f"validation {key}")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
        if len(epochs) < 15:
            ax.set_xticks(epochs)
    fig.tight_layout()
    return _finish(fig, path)


def confusion_matrix(y_true, y_pred, num_classes=None):
    """Counts ``m[i, j]`` of samples of class i predicted as j (labels: integers or one-hot rows)."""
    t, p = _labels(y_true), _labels(y_pred)
    k = num_classes or int(max(t.max(), p.max())) + 1
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def plot_confusion_matrix(model_or_predictions, x, y, path=None, class_names=None):
    """Which classes are mistaken for which: counts of true class (row) × predicted class (column).

    The first argument is a model (which predicts ``x``) or its predictions already computed (then ``x``
    may be None). Cells are shaded by the share of their row.
    """
    probs = model_or_predictions
    if hasattr(probs, "predict"):
        probs = probs.predict(x, verbose=0)
    probs = np.asarray(probs)
    k = probs.shape[1]
    m = confusion_matrix(y, probs.argmax(axis=1), k)
    names = class_names or [str(i) for i in range(k)]
    fig = _figure(max(1.4 + 0.5 * k, 3.8), max(1.2 + 0.5 * k, 3.2))
    ax = fig.add_subplot()
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else ("firebrick" if i != j else "black"))
    ax.set_xticks(range(k), names)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"{m.sum()} samples, accuracy {acc:.4f}, {m.sum() - np.trace(m)} errors", fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)


def plot_most_confident_errors(model, x, y, n=16, path=None, cols=8):
    """The ``n`` misclassified images the model was surest about, each titled true → predicted (p)."""
    probs = model.predict(x, verbose=0)
    truth, pred = _labels(y), probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != truth)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(len(wrong) / cols))
    fig = _figure(max(cols * 1.3, 6.0), rows * 1.5 + 0.5)
    if not len(wrong):
        fig.text(0.5, 0.5, f"no errors on {'this image' if len(x) == 1 else f'these {len(x)} images'}",
                 ha="center", va="center")
        return _finish(fig, path)
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"top": 1 - 0.5 / (rows * 1.5 + 0.5),
                                                                "bottom": 0.02, "left": 0.02,
                                                                "right": 0.98, "hspace": 0.35})
    for ax, i in zip(axes.flat, list(wrong) + [None] * (rows * cols - len(wrong))):
        if i is None:
            ax.set_axis_off()
            continue
        _show_image(ax, np.asarray(x[i]))
        ax.set_title(f"{truth[i]} → {pred[i]} ({probs[i, pred[i]]:.2f})", fontsize=9, color="firebrick")
    fig.suptitle(f"the {len(wrong)} most confident of {len(np.flatnonzero(pred != truth))} errors: "
                 "true → predicted (probability)", fontsize=10)
    return _finish(fig, path)


# ===================================================================================== experiments
def plot_sweep(results, x_key, y_key="val_accuracy", hue=None, path=None, label_key="name", title=None):
    """One point per result (a list of dicts, as ``gpucnn.sweep.run_sweep`` returns): ``y_key`` against
    ``x_key``, one colour per value of ``hue``. A numeric ``x_key`` gets a numeric axis (logarithmic
    for ``params``); any other is shown as categories. Points are labelled by ``label_key``."""
    results = list(results)
    if not results:
        raise ValueError("plot_sweep needs at least one result")
    for key in (x_key, y_key) + ((hue,) if hue else ()):
        if key not in results[0]:
            raise ValueError(f"results have no key {key!r}; keys: {sorted(results[0])}")
    xs = [r[x_key] for r in results]
    numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                  for v in xs)
    categories = [] if numeric else list(dict.fromkeys(str(v) for v in xs))
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    groups = list(dict.fromkeys(str(r[hue]) for r in results)) if hue else [None]
    for g, group in enumerate(groups):
        rows = [r for r in results if hue is None or str(r[hue]) == group]
        shift = 0.08 * (g - (len(groups) - 1) / 2)  # side by side when groups share a category
        px = [float(r[x_key]) if numeric else categories.index(str(r[x_key])) + shift for r in rows]
        py = [r[y_key] for r in rows]
        label = None if hue is None else f"{hue} = {group}"
        ax.plot(px, py, "o", markersize=8, color=f"C{g}", label=label)
        if len(results) <= 16 and label_key in rows[0] and label_key != x_key:
            for a, b, r in zip(px, py, rows):
                ax.annotate(str(r[label_key]), (a, b), textcoords="offset points", xytext=(6, 4),
                            fontsize=8)
    if numeric and x_key == "params":
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.margins(x=0.15, y=0.15)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.grid(alpha=0.3)
    if hue is not None:
        ax.legend()
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig, path)
