"""Pictures: each plot returns a Figure and writes a PNG of the figure's size; a clear error without
matplotlib."""
import struct
import sys

import numpy as np
import pytest

from gpucnn import callbacks, layers, models, viz


pytestmark = pytest.mark.usefixtures("numpy_engine")


@pytest.fixture
def mpl():
    return pytest.importorskip("matplotlib")


def tiny_model(channels=1):
    model = models.Sequential([
        layers.Conv2D(5, 3, activation="relu", input_shape=(8, 8, channels)),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(3, activation="softmax"),
    ])
    model.compile("sgd", "sparse_categorical_crossentropy", ["accuracy"])
    return model


def tiny_data(n=24):
    r = np.random.default_rng(0)
    return r.random((n, 8, 8, 1)).astype(np.float32), r.integers(0, 3, n)


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_png(fig, path):
    from matplotlib.figure import Figure
    assert isinstance(fig, Figure)
    w, h = fig.get_size_inches() * viz.DPI
    assert png_size(path) == (round(w), round(h))
    assert path.stat().st_size > 2000  # something was drawn


# ===================================================================================== each picture
def test_feature_maps_show_every_channel_of_every_image_layer(mpl, tmp_path):
    model, (x, _) = tiny_model(), tiny_data(1)
    fig = viz.plot_feature_maps(model, x[0], path=tmp_path / "maps.png")
    check_png(fig, tmp_path / "maps.png")
    images = [im for sub in fig.subfigs for ax in sub.axes for im in ax.get_images()]
    assert len(images) == 1 + 5 + 5  # the input, conv2d's 5 maps, max_pooling2d's 5 maps
    conv = model.layer_outputs(x, ["conv2d"])["conv2d"][0]
    np.testing.assert_array_equal(fig.subfigs[1].axes[2].get_images()[0].get_array(), conv[:, :, 2])
    titles = [sub._suptitle.get_text() for sub in fig.subfigs[1:]]
    assert titles == ["conv2d (Conv2D): 5 maps of 6×6", "max_pooling2d (MaxPooling2D): 5 maps of 3×3"]
    one = viz.plot_feature_maps(model, x[:1], layers=["max_pooling2d"])  # a batch of one works too
    assert len(one.subfigs) == 2
    with pytest.raises(ValueError, match="'flatten' outputs a flat vector"):
        viz.plot_feature_maps(model, x[0], layers=["flatten"])


def test_feature_maps_of_a_functional_model_skip_its_input_layer(mpl):
    """A functional model lists its InputLayer among its layers (as Keras does): its image-shaped output is not a
    layer's response, and layer_outputs does not know it (plot_feature_maps raised "no layer named ...")."""
    import gpucnn as keras
    inputs = keras.Input(shape=(8, 8, 1))
    h = keras.layers.MaxPooling2D(2)(keras.layers.Conv2D(3, 3, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(h)))
    fig = viz.plot_feature_maps(model, np.random.default_rng(0).random((8, 8, 1), dtype=np.float32))
    titles = [sub._suptitle.get_text() for sub in fig.subfigs[1:]]
    assert titles == ["conv2d (Conv2D): 3 maps of 6×6", "max_pooling2d (MaxPooling2D): 3 maps of 3×3"]
    block = keras.Model(inputs, h, name="block")  # a model used as a layer: its output_shape has the batch axis
    outer = keras.Sequential([block, keras.layers.Flatten(), keras.layers.Dense(2)])
    fig = viz.plot_feature_maps(outer, np.zeros((8, 8, 1), np.float32))
    assert [sub._suptitle.get_text() for sub in fig.subfigs[1:]] == ["block (Model): 3 maps of 3×3"]


@pytest.mark.parametrize("channels", [1, 3, 2])
def test_filters_of_the_first_convolution(mpl, tmp_path, channels):
    model = tiny_model(channels)
    fig = viz.plot_filters(model, path=tmp_path / "f.png")
    check_png(fig, tmp_path / "f.png")
    images = [im for ax in fig.axes for im in ax.get_images()]
    assert len(images) == 5
    kernel = model.get_weights()[0]
    shown = images[4].get_array()
    if channels == 3:
        assert shown.shape == (3, 3, 3)
    else:
        np.testing.assert_allclose(shown, kernel[:, :, :, 4].mean(axis=2), rtol=1e-6)
    assert ("mean over 2 input channels" in fig._suptitle.get_text()) is (channels == 2)


def test_history_curves(mpl, tmp_path):
    model, data = tiny_model(), tiny_data()
    history = model.fit(*data, batch_size=8, epochs=3, verbose=0, validation_data=tiny_data(9))
    fig = viz.plot_history(history, path=tmp_path / "h.png")
    check_png(fig, tmp_path / "h.png")
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["training loss", "validation loss"]
    np.testing.assert_array_equal(acc_ax.lines[1].get_ydata(), history.history["val_accuracy"])
    np.testing.assert_array_equal(loss_ax.lines[0].get_xdata(), [1, 2, 3])
    assert len(viz.plot_history({"loss": [1.0, 0.5]}).axes) == 1  # no metrics, no validation
    with pytest.raises(ValueError, match="'loss' list"):
        viz.plot_history(callbacks.History())


def test_confusion_matrix_counts_and_picture(mpl, tmp_path):
    y = np.array([0, 0, 1, 2, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 2, 0, 2]]
    np.testing.assert_array_equal(viz.confusion_matrix(y, probs), [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    fig = viz.plot_confusion_matrix(probs, None, np.eye(3)[y], path=tmp_path / "cm.png")
    check_png(fig, tmp_path / "cm.png")
    assert fig.axes[0].get_title() == "6 samples, accuracy 0.6667, 2 errors"
    model, (x, labels) = tiny_model(), tiny_data()
    fig = viz.plot_confusion_matrix(model, x, labels)
    assert fig.axes[0].get_title().startswith("24 samples")


def test_most_confident_errors_come_first(mpl, tmp_path):
    model, (x, y) = tiny_model(), tiny_data()
    probs = model.predict(x, verbose=0)
    wrong = np.flatnonzero(probs.argmax(1) != y)
    fig = viz.plot_most_confident_errors(model, x, y, n=4, path=tmp_path / "e.png")
    check_png(fig, tmp_path / "e.png")
    shown = [ax.get_title() for ax in fig.axes if ax.get_images()]
    confidences = [float(t.rsplit("(", 1)[1].rstrip(")")) for t in shown]
    assert len(shown) == min(4, len(wrong)) and confidences == sorted(confidences, reverse=True)
    top = wrong[np.argmax(probs[wrong].max(1))]
    assert shown[0].startswith(f"{y[top]} → {probs[top].argmax()} ")
    fig = viz.plot_most_confident_errors(model, x[:3], probs[:3].argmax(1))
    assert "no errors on these 3 images" in fig.texts[0].get_text()


def test_sweep_plots_numeric_and_categorical_axes(mpl, tmp_path):
    results = [{"name": "a", "params": 1000, "kernel_size": 3, "pooling": "max", "val_accuracy": 0.9},
               {"name": "b", "params": 5000, "kernel_size": 5, "pooling": "max", "val_accuracy": 0.95},
               {"name": "c", "params": 90000, "kernel_size": 3, "pooling": "none", "val_accuracy": 0.93}]
    fig = viz.plot_sweep(results, "params", hue="pooling", path=tmp_path / "s.png")
    check_png(fig, tmp_path / "s.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and [l.get_label() for l in ax.lines] == ["pooling = max",
                                                                              "pooling = none"]
    assert [t.get_text() for t in ax.texts] == ["a", "b", "c"]
    ax = viz.plot_sweep(results, "pooling").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["max", "none"]
    with pytest.raises(ValueError, match="no key 'depth'"):
        viz.plot_sweep(results, "depth")


# ===================================================================================== no matplotlib
def test_a_clear_error_without_matplotlib(monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes ``import`` fail as if not installed
    with pytest.raises(ImportError, match=r"pip install matplotlib .*pip install -e '\.\[viz\]'"):
        viz.plot_history({"loss": [1.0]})


def test_importing_viz_does_not_import_matplotlib():
    import subprocess
    code = "import sys, gpucnn.viz; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
