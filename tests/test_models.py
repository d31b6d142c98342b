"""The Keras workflow on the NumPy engine: layers, Sequential, summary, compile/fit/evaluate/predict,
weights in and out, the progress output, and a clear error for every bad input."""
import io
import re

import numpy as np
import pytest

from gpucnn import callbacks, layers, losses, models, optimizers, utils
from gpucnn.cli import seed_model


pytestmark = pytest.mark.usefixtures("numpy_engine")


def tiny_model(activation="softmax", classes=3):
    return models.Sequential([
        layers.Conv2D(4, 3, activation="relu", input_shape=(8, 8, 1)),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(classes, activation=activation),
    ])


def tiny_data(n=48, classes=3, seed=0):
    """Images whose class is the quadrant holding a bright square: learnable in a few steps."""
    r = np.random.default_rng(seed)
    y = r.integers(0, classes, n)
    x = r.random((n, 8, 8, 1)).astype(np.float32) * 0.1
    for i, c in enumerate(y):
        x[i, (c // 2) * 4:(c // 2) * 4 + 3, (c % 2) * 4:(c % 2) * 4 + 3, 0] += 1.0
    return x, y


# ===================================================================================== summary
SEED_ROWS = [
    ("conv2d (Conv2D)", "(None, 26, 26, 32)", "320"),
    ("max_pooling2d (MaxPooling2D)", "(None, 13, 13, 32)", "0"),
    ("conv2d_1 (Conv2D)", "(None, 11, 11, 64)", "18,496"),
    ("max_pooling2d_1 (MaxPooling2D)", "(None, 5, 5, 64)", "0"),
    ("conv2d_2 (Conv2D)", "(None, 3, 3, 64)", "36,928"),
    ("flatten (Flatten)", "(None, 576)", "0"),
    ("dense (Dense)", "(None, 64)", "36,928"),
    ("dense_1 (Dense)", "(None, 10)", "650"),
]


def summary_text(model):
    lines = []
    model.summary(print_fn=lines.append)
    return lines


def test_seed_model_summary_matches_keras():
    lines = summary_text(seed_model())
    assert lines[0] == 'Model: "sequential"'
    rows = [tuple(c.strip() for c in line.strip("│").split("│")) for line in lines if line.startswith("│")]
    assert rows == SEED_ROWS
    assert lines[-3:] == [" Total params: 93,322 (364.54 KB)", " Trainable params: 93,322 (364.54 KB)",
                          " Non-trainable params: 0 (0.00 B)"]
    assert len({len(line) for line in lines[1:-3]}) == 1  # a rectangular table


def test_wide_variant_parameter_count():
    model = seed_model((64, 64, 128), 128)
    # 640 + 36,928 + 73,856 (conv) + 1152·128 + 128 + 1,290 (dense): Keras's count for this variant.
    assert [l.count_params() for l in model.layers] == [640, 0, 36928, 0, 73856, 0, 147584, 1290]
    assert model.count_params() == 260298
    assert summary_text(model)[-3] == " Total params: 260,298 (1016.79 KB)"


def test_default_names_follow_keras_and_clear_session_restarts_them():
    a, b = seed_model(), seed_model()
    assert a.name == "sequential" and b.name == "sequential_1"
    assert b.layers[0].name == "conv2d_3"
    utils.clear_session()
    assert seed_model().layers[0].name == "conv2d"
    assert layers.GlobalAveragePooling2D().name == "global_average_pooling2d"
    assert layers.AveragePooling2D().name == "average_pooling2d"


def test_input_layer_and_add_build_the_same_model():
    m = models.Sequential()
    m.add(layers.Input(shape=(28, 28, 1)))
    m.add(layers.Conv2D(8, (3, 3), padding="same", strides=2))
    m.add(layers.GlobalAveragePooling2D())
    assert m.output_shape == (None, 8)
    assert m.layers[0].output_shape == (14, 14, 8)


@pytest.mark.parametrize("size,k,s,padding,expect", [
    (28, 3, 1, "valid", 26), (28, 3, 1, "same", 28), (28, 3, 2, "same", 14), (27, 4, 2, "same", 14),
    (5, 5, 1, "valid", 1), (7, 2, 3, "valid", 2),
])
def test_conv_output_sizes(size, k, s, padding, expect):
    layer = layers.Conv2D(2, k, strides=s, padding=padding.upper())
    assert layer.build((size, size, 1)) == (expect, expect, 2)


def test_pooling_defaults_and_odd_sizes():
    pool = layers.MaxPooling2D()
    assert pool.pool_size == (2, 2) and pool.strides == (2, 2)
    assert pool.build((11, 11, 3)) == (5, 5, 3)  # the odd last row is dropped
    assert layers.AveragePooling2D(3, strides=1, padding="same").build((5, 7, 2)) == (5, 7, 2)


def test_glorot_uniform_bounds_and_zero_bias():
    model = seed_model()
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            receptive = int(np.prod(kernel.shape[:-2]))
            limit = np.sqrt(6 / (kernel.shape[-2] * receptive + kernel.shape[-1] * receptive))
            assert np.abs(kernel).max() <= limit
            assert np.abs(kernel).max() > 0.9 * limit  # really spread over the whole interval
            assert not bias.any()


# ===================================================================================== weights
def test_weights_layouts_order_and_round_trip():
    model = seed_model()
    shapes = [w.shape for w in model.get_weights()]
    assert shapes == [(3, 3, 1, 32), (32,), (3, 3, 32, 64), (64,), (3, 3, 64, 64), (64,),
                      (576, 64), (64,), (64, 10), (10,)]
    new = [np.random.default_rng(i).standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)]
    model.set_weights(new)
    for a, b in zip(model.get_weights(), new):
        np.testing.assert_array_equal(a, b)
    # the returned arrays are copies: changing them leaves the model alone
    model.get_weights()[0][...] = 7
    np.testing.assert_array_equal(model.get_weights()[0], new[0])


def test_set_weights_refuses_wrong_shapes_and_counts():
    model = seed_model()
    w = model.get_weights()
    with pytest.raises(ValueError, match="10 weight arrays, got 9"):
        model.set_weights(w[:-1])
    w[0] = np.zeros((3, 3, 1, 16))
    with pytest.raises(ValueError, match=r"kernel must have shape \(3, 3, 1, 32\)"):
        model.set_weights(w)


def test_same_seed_same_model_and_same_training():
    def run():
        utils.clear_session()
        utils.set_random_seed(42)
        m = tiny_model()
        m.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
        x, y = tiny_data()
        m.fit(x, y, batch_size=8, epochs=2, verbose=0)
        return m.get_weights()
    for a, b in zip(run(), run()):
        np.testing.assert_array_equal(a, b)


# ===================================================================================== training
@pytest.mark.parametrize("optimizer", ["rmsprop", "adam", optimizers.SGD(0.1, momentum=0.9),
                                       optimizers.RMSprop(0.003, momentum=0.5, centered=True)])
def test_fit_learns_and_reports_keras_history(optimizer):
    model = tiny_model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = tiny_data(96)
    history = model.fit(x, y, batch_size=16, epochs=30, verbose=0, validation_split=0.25)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert len(history.history["loss"]) == 30 and history.epoch == list(range(30))
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert history.history["accuracy"][-1] >= 0.9
    loss, acc = model.evaluate(x, y, verbose=0)
    assert acc >= 0.9 and loss < 0.5


def test_categorical_and_sparse_losses_agree():
    x, y = tiny_data(32)
    results = []
    for loss, labels in (("categorical_crossentropy", utils.to_categorical(y, 3)),
                         ("sparse_categorical_crossentropy", y)):
        utils.clear_session()
        utils.set_random_seed(3)
        m = tiny_model()
        m.compile("sgd", loss, ["accuracy"])
        m.fit(x, labels, batch_size=8, epochs=1, verbose=0, shuffle=False)
        results.append((m.evaluate(x, labels, verbose=0), m.get_weights()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_non_softmax_output_trains_through_the_general_gradient():
    model = tiny_model(activation="relu")  # probabilities straight from a ReLU: the clipped loss
    model.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
    x, y = tiny_data(32)
    hist = model.fit(x, utils.to_categorical(y, 3) * 0.98 + 0.005, batch_size=8, epochs=3, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()


def test_validation_split_takes_the_last_samples_before_shuffling():
    seen = []

    class Spy(callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(logs)

    model = tiny_model()
    model.compile("sgd", "sparse_categorical_crossentropy", ["accuracy"])
    x, y = tiny_data(40)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, validation_split=0.25, callbacks=[Spy()])
    expected = model.evaluate(x[30:], y[30:], verbose=0, return_dict=True)
    assert seen[0]["val_loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert seen[0]["val_accuracy"] == pytest.approx(expected["accuracy"])


def test_evaluate_without_metrics_returns_a_scalar_and_predict_returns_probabilities():
    model = tiny_model()
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = tiny_data(10)
    assert isinstance(model.evaluate(x, y, verbose=0), float)
    p = model.predict(x, batch_size=3, verbose=0)
    assert isinstance(p, np.ndarray) and p.shape == (10, 3) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(p[4:7], model.predict(x[4:7], verbose=0), rtol=1e-6)


def test_callback_hooks_fire_in_keras_order_and_can_stop_training():
    calls = []

    class Recorder(callbacks.Callback):
        def __getattribute__(self, name):
            if name.startswith("on_") and name not in ("on_batch_begin", "on_batch_end"):  # (forwarded to, within)
                calls.append(name)
            return object.__getattribute__(self, name)

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                self.model.stop_training = True

    model = tiny_model()
    model.compile("sgd", "sparse_categorical_crossentropy", ["accuracy"])
    x, y = tiny_data(8)
    history = model.fit(x, y, batch_size=4, epochs=5, verbose=0, callbacks=[Recorder()])
    assert history.epoch == [0, 1]
    assert calls[:4] == ["on_train_begin", "on_epoch_begin", "on_train_batch_begin", "on_train_batch_end"]
    assert calls[-2:] == ["on_epoch_end", "on_train_end"]


# ===================================================================================== progress output
def fit_output(capsys, verbose, epochs=2):
    model = tiny_model()
    model.compile("sgd", "sparse_categorical_crossentropy", ["accuracy"])
    x, y = tiny_data(20)
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=verbose)
    return capsys.readouterr().out


def test_progress_plain_lines_when_not_a_terminal(capsys):
    out = fit_output(capsys, 1)
    lines = out.splitlines()
    assert lines[0] == "Epoch 1/2" and lines[2] == "Epoch 2/2"
    assert "\r" not in out
    assert re.fullmatch(r"3/3 ━{20} \d+s \d+(ms|us|s)/step - accuracy: \d\.\d{4} - loss: \d\.\d{4}",
                        lines[1])


def test_progress_verbose_2_and_0(capsys):
    lines = fit_output(capsys, 2, epochs=1).splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"3/3 - \d+s - \d+(ms|us|s)/step - accuracy: \d\.\d{4} - loss: \d\.\d{4}", lines[0])
    assert fit_output(capsys, 0) == ""


def test_progress_line_shows_what_callbacks_log_after_the_epochs_own_values(capsys):
    """Keras's progress bar is the last callback: the epoch's line comes after the others' messages and shows the
    learning_rate ReduceLROnPlateau logs, at its end; a value that is not a number is shown as it is."""
    class Note(callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["note"] = "ok"
            logs["rate"] = self.model.optimizer.learning_rate  # a variable, or a 0-d array: shown as a number
            logs["zero_d"] = np.array(0.5)
            logs["ragged"] = [[1], [2, 3]]  # shown as it prints (no ndim: it was an error after the epoch)

    model = tiny_model()
    model.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
    x, y = tiny_data(20)
    model.fit(x, y, batch_size=8, epochs=2, verbose=2, callbacks=[
        callbacks.ReduceLROnPlateau("loss", patience=0, min_delta=10, verbose=1), Note()])
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert lines[2] == "Epoch 2/2" and lines[3].startswith("Epoch 2: ReduceLROnPlateau reducing learning rate to 0.0001")
    for line, now in ((lines[1], "0010"), (lines[4], "0001")):  # (learning_rate: the rate each epoch trained with)
        assert re.fullmatch(r"3/3 - \d+s - \d+(ms|us|s)/step - accuracy: \d\.\d{4} - loss: \d\.\d{4} - "
                            rf"learning_rate: 0\.0010 - note: ok - rate: 0\.{now} - zero_d: 0\.5000 - "
                            r"ragged: \[\[1\], \[2, 3\]\]", line)


def test_progress_redraws_in_place_on_a_terminal():
    from gpucnn.progress import Progbar

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = Progbar(4, verbose=1, stream=stream, interval=0)
    for step in range(1, 5):
        bar.update(step, {"loss": 1.0 / step})
    bar.finish({"loss": 0.25})
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.count("\n") == 1 and text.endswith("- loss: 0.2500\n")


# ===================================================================================== bad input
@pytest.fixture
def compiled():
    model = seed_model()
    model.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
    return model


def onehot(n):
    return utils.to_categorical(np.arange(n) % 10, 10)


def test_mnist_without_channel_axis_says_add_it(compiled):
    with pytest.raises(ValueError, match=r"lack the channel axis.*reshape\(\(4, 28, 28, 1\)\)"):
        compiled.fit(np.zeros((4, 28, 28), np.float32), onehot(4), verbose=0)


def test_wrong_image_shape(compiled):
    with pytest.raises(ValueError, match=r"expects \(N, 28, 28, 1\)"):
        compiled.evaluate(np.zeros((4, 32, 32, 3), np.float32), onehot(4), verbose=0)


@pytest.mark.parametrize("bad", [np.array([["a"] * 784] * 2).reshape(2, 28, 28, 1),
                                 np.zeros((2, 28, 28, 1), np.complex64),
                                 np.empty((2, 28, 28, 1), object)])
def test_non_numeric_inputs_are_refused(compiled, bad):
    with pytest.raises(TypeError, match="numeric array"):
        compiled.predict(bad, verbose=0)


def test_integer_and_float64_inputs_are_cast(compiled):
    p64 = compiled.predict(np.full((2, 28, 28, 1), 0.5), verbose=0)
    p8 = compiled.predict(np.ones((2, 28, 28, 1), np.uint8), verbose=0)
    assert p64.dtype == p8.dtype == np.float32


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_inputs_are_refused(compiled, value):
    x = np.zeros((3, 28, 28, 1), np.float32)
    x[2, 5, 5, 0] = value
    with pytest.raises(ValueError, match="NaN or infinity.*sample 2"):
        compiled.fit(x, onehot(3), verbose=0)


def test_one_hot_of_the_wrong_width(compiled):
    with pytest.raises(ValueError, match=r"one-hot y of shape \(N, 10\).*got shape \(4, 9\)"):
        compiled.fit(np.zeros((4, 28, 28, 1), np.float32), utils.to_categorical(np.arange(4), 9), verbose=0)


def test_integer_labels_with_categorical_loss_suggest_the_fix(compiled):
    with pytest.raises(ValueError, match="to_categorical.*sparse_categorical_crossentropy"):
        compiled.fit(np.zeros((4, 28, 28, 1), np.float32), np.arange(4), verbose=0)


@pytest.mark.parametrize("label", [10, -1])
def test_sparse_labels_out_of_range(label):
    model = seed_model()
    model.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
    y = np.array([1, 2, label, 3])
    with pytest.raises(ValueError, match=rf"label {label} at index 2 .* 0\.\.9"):
        model.fit(np.zeros((4, 28, 28, 1), np.float32), y, verbose=0)


def test_sample_count_mismatch(compiled):
    with pytest.raises(ValueError, match="y has 3 samples but x has 4"):
        compiled.fit(np.zeros((4, 28, 28, 1), np.float32), onehot(3), verbose=0)


def test_window_larger_than_input():
    with pytest.raises(ValueError, match="3x3 kernel is larger than its 2x2 input"):
        models.Sequential([layers.Conv2D(2, 3, input_shape=(2, 2, 1))]).build()
    with pytest.raises(ValueError, match="4x4 window is larger than its 3x3 input"):
        models.Sequential([layers.MaxPooling2D(4, input_shape=(3, 3, 1))]).build()


def test_dense_on_images_applies_per_pixel_as_keras():
    m = models.Sequential([layers.Dense(3, input_shape=(4, 4, 1))])
    m.build()
    assert m.output_shape == (None, 4, 4, 3) and m.count_params() == 6


@pytest.mark.parametrize("make", [
    lambda: layers.Dense(3, activation="tanhh"),
    lambda: models.Sequential([layers.Dense(1)]).compile(optimizer="adagradd", loss="categorical_crossentropy"),
    lambda: models.Sequential([layers.Dense(1)]).compile(optimizer="sgd", loss="mse"),
    lambda: models.Sequential([layers.Dense(1)]).compile(optimizer="sgd", loss="categorical_crossentropy",
                                                         metrics=["auc"]),
    lambda: layers.Conv2D(2, 3, padding="full"),
])
def test_unknown_names_are_refused(make):
    with pytest.raises(ValueError, match="unknown|must be"):
        make()


def test_fit_before_compile(compiled):
    model = seed_model()
    with pytest.raises(RuntimeError, match="compile the model before calling fit"):
        model.fit(np.zeros((2, 28, 28, 1), np.float32), onehot(2))


def test_bad_batch_size(compiled):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        compiled.fit(np.zeros((2, 28, 28, 1), np.float32), onehot(2), batch_size=0)


def test_divergence_stops_training_with_a_message():
    model = models.Sequential([layers.Conv2D(4, 3, input_shape=(8, 8, 1)), layers.Flatten(),
                               layers.Dense(8), layers.Dense(3, activation="softmax")])
    model.compile(optimizers.SGD(learning_rate=1e6), "sparse_categorical_crossentropy", ["accuracy"])
    x, y = tiny_data(64)
    seen = []

    class Count(callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(logs["loss"])

    with pytest.raises(models.TrainingDivergedError, match=r"loss became nan at epoch 1, step \d.*"
                                                           "Lower the learning rate"):
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[Count()])
    assert len(seen) < 8 and np.isfinite(seen[:-1]).all()  # stopped at the first non-finite loss
    assert not np.isfinite(seen[-1])


def test_to_categorical_matches_keras():
    y = utils.to_categorical([0, 2, 1, 2])
    assert y.dtype == np.float64 and y.shape == (4, 3)
    np.testing.assert_array_equal(y.argmax(1), [0, 2, 1, 2])
    assert utils.to_categorical(np.array([[1], [0]]), 4).shape == (2, 4)
    with pytest.raises(ValueError, match="out of range"):
        utils.to_categorical([3], 3)


# ===================================================================================== review findings
def test_a_built_layer_keeps_its_weights_and_refuses_another_shape():
    conv = layers.Conv2D(2, 3)
    m = models.Sequential([layers.Input((10, 10, 1)), conv])
    m.build()
    assert conv.build((10, 10, 1)) == (8, 8, 2) and conv.count_params() == 20
    assert len(m.get_weights()) == 2
    with pytest.raises(ValueError, match=r"built for inputs \(10, 10, 1\) and cannot take \(9, 9, 1\)"):
        models.Sequential([layers.Input((9, 9, 1)), conv]).build()


def test_a_failed_first_fit_leaves_the_model_usable():
    m = models.Sequential([layers.Conv2D(4, 3, activation="relu"), layers.Flatten(),
                           layers.Dense(3, activation="softmax")])
    m.compile("sgd", "sparse_categorical_crossentropy", ["accuracy"])
    x, y = tiny_data(8)
    with pytest.raises(ValueError, match="channel axis"):
        m.fit(x[..., 0], y, verbose=0)
    m.fit(x, y, verbose=0)
    assert m.input_shape == (None, 8, 8, 1) and m.count_params() == 4 * 10 + 144 * 3 + 3


def test_nan_in_one_hot_labels_is_named():
    model = tiny_model()
    model.compile("sgd", "categorical_crossentropy")
    x, y = tiny_data(4)
    y = utils.to_categorical(y, 3)
    y[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity.*sample 2"):
        model.fit(x, y, verbose=0)


def test_a_frozen_layer_keeps_its_weights_and_counts_as_non_trainable():
    """trainable=False before a compile: the weights stay, counted as non-trainable."""
    m = tiny_model()
    m.compile("sgd", "sparse_categorical_crossentropy")
    conv = m.layers[0]
    conv.trainable = False
    m.compile("sgd", "sparse_categorical_crossentropy")
    before = conv.get_weights()
    dense_before = m.layers[-1].get_weights()
    m.fit(*tiny_data(8), epochs=1, verbose=0)
    for a, b in zip(before, conv.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(dense_before[0], m.layers[-1].get_weights()[0])
    lines = summary_text(m)
    assert lines[-3] == f" Trainable params: {m.layers[-1].count_params():,} ({lines[-3].split('(')[1]}"
    assert lines[-2].startswith(f" Non-trainable params: {conv.count_params():,} ")
    assert lines[-1] == " Optimizer params: 2 (8.00 B)"  # after training, as Keras: plain SGD's step count and rate


def _fit_twice(freeze, recompile, second_batch, optimizer=lambda: optimizers.SGD(0.1, momentum=0.9)):
    """A model fit one epoch, ``freeze(model)`` applied, compiled again with the same optimizer when
    ``recompile``, and fit one more epoch at batch ``second_batch``; returns (model, weights between the fits)."""
    utils.set_random_seed(3)
    m = tiny_model()
    m.compile(optimizer(), "sparse_categorical_crossentropy")
    x, y = tiny_data(24)
    m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    freeze(m)
    if recompile:
        m.compile(m.optimizer, "sparse_categorical_crossentropy")
    between = m.get_weights()
    m.fit(x, y, batch_size=second_batch, shuffle=False, verbose=0)
    return m, between


@pytest.mark.parametrize("second_batch", [8, 16])
def test_freezing_between_fits_takes_effect_at_the_next_fit(second_batch):
    """Keras 3 (its torch and JAX backends) trains only what is trainable now, compiled again or not: the frozen
    layer keeps its weights bit for bit (before, the layer trained on at the same batch size, and at another one
    took the previous fit's last gradient: stale updates), and both ways give the same weights."""
    def freeze(m):
        m.layers[0].trainable = False
    m, between = _fit_twice(freeze, False, second_batch)
    again, _ = _fit_twice(freeze, True, second_batch)
    for a, b in zip(between[:2], m.get_weights()[:2]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(between[2], m.get_weights()[2])
    for a, b in zip(m.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert m.optimizer.iterations == 3 + 24 // second_batch + (24 % second_batch > 0)


def test_recompiling_with_the_same_optimizer_keeps_its_state_and_step_count():
    """Keras's optimizer keeps its variables across compiles: one epoch, compile again with the same Adam, one
    epoch gives the weights of two epochs in a row; a new optimizer object starts afresh."""
    m, _ = _fit_twice(lambda m: None, True, 8, optimizers.Adam)
    straight, _ = _fit_twice(lambda m: None, False, 8, optimizers.Adam)
    assert m.optimizer.iterations == straight.optimizer.iterations == 6
    for a, b in zip(m.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)
    m.compile(optimizers.Adam(), "sparse_categorical_crossentropy")
    assert m.optimizer.iterations == 0 and m.optimizer.state is None


def test_unfreezing_a_layer_the_optimizer_never_trained_asks_for_a_new_optimizer():
    """A layer frozen from the start, unfrozen after training: the optimizer holds no state for it (Keras refuses
    it: "Unknown variable"), between fits and from a callback alike; compiled with a new optimizer, it trains."""
    utils.set_random_seed(3)
    m = tiny_model()
    m.layers[0].trainable = False
    m.compile(optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    x, y = tiny_data(24)
    m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    m.layers[0].trainable = True
    before = [w.copy() for w in m.get_weights()]
    for recompile in (False, True):
        if recompile:  # compiling again with it is taken (to evaluate, say), as Keras takes it; training is not
            m.compile(m.optimizer, "sparse_categorical_crossentropy", metrics=["accuracy"])
            m.evaluate(x, y, verbose=0)
        with pytest.raises(ValueError, match="has trained this model \\(3 steps\\) and holds no state for 2 of the "
                                             "weights.*kernel of layer 'conv2d.*Compile with a new optimizer"):
            m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    for a, b in zip(m.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    m.layers[0].trainable = False
    m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    unfreeze = callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: setattr(m.layers[0], "trainable", True))
    with pytest.raises(ValueError, match="holds no state"):
        m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[unfreeze])
    m.compile(optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert not np.array_equal(before[0], m.layers[0].get_weights()[0]) and m.optimizer.iterations == 3


def test_a_layer_frozen_and_unfrozen_again_keeps_its_optimizer_state():
    """Keras's optimizer keeps a variable's state while it is frozen: the convolution's momentum is set aside when
    it is frozen (the other weights' goes on) and is its own again when it is unfrozen, not zeros."""
    utils.set_random_seed(3)
    m = tiny_model()
    m.compile(optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    x, y = tiny_data(24)
    m.fit(x, y, batch_size=8, shuffle=False, verbose=0)

    def momentum_of(weight):
        lo = {id(w): lo for _, _, w, _, lo in m._layout}[id(weight)]
        return m.optimizer.state["momentum"][lo:lo + weight.size].copy()
    conv = momentum_of(m.layers[0].weights[0])
    assert np.abs(conv).max() > 0
    m.layers[0].trainable = False
    m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    m.layers[0].trainable = True
    m._sync_trainable()
    np.testing.assert_array_equal(momentum_of(m.layers[0].weights[0]), conv)
    assert not m.optimizer.parked


def test_freezing_in_a_callback_takes_effect_at_the_next_step():
    """A callback freezes the convolution after the first step: the later steps (the last one of a smaller batch
    too, which gets new contexts) leave it as it was then."""
    utils.set_random_seed(3)
    m = tiny_model()
    m.compile(optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    seen = {}

    def after(batch, logs):
        if batch == 0:
            m.layers[0].trainable = False
            seen["conv"] = [w.copy() for w in m.layers[0].get_weights()]
    x, y = tiny_data(20)
    m.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[callbacks.LambdaCallback(on_train_batch_end=after)])
    for a, b in zip(seen["conv"], m.layers[0].get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_batch_normalization_frozen_between_fits_keeps_all_four_weights():
    """Frozen after a fit: inference mode (moving statistics unchanged) and gamma and beta no longer trained."""
    utils.set_random_seed(4)
    m = models.Sequential([layers.Conv2D(4, 3, input_shape=(8, 8, 1)), layers.BatchNormalization(),
                           layers.Activation("relu"), layers.Flatten(), layers.Dense(3, activation="softmax")])
    m.compile("rmsprop", "sparse_categorical_crossentropy")
    x, y = tiny_data(24)
    m.fit(x, y, batch_size=8, verbose=0)
    m.layers[1].trainable = False
    before = [w.copy() for w in m.layers[1].get_weights()]
    m.fit(x, y, batch_size=8, verbose=0)
    for a, b in zip(before, m.layers[1].get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_seeded_dropout_draws_a_new_mask_each_step_and_repeats_across_runs():
    def masks():
        layer = layers.Dropout(0.5, seed=7)
        x = np.ones((4, 16), np.float32)
        return [layer(x, training=True) for _ in range(2)]
    a, b = masks(), masks()
    assert not np.array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_adding_a_layer_asks_for_a_new_optimizer():
    """Keras refuses an optimizer a weight is unknown to; adding a layer without weights changes nothing."""
    m = models.Sequential([layers.Input((4,)), layers.Dense(3, activation="softmax")])
    m.compile("adam", "sparse_categorical_crossentropy")
    x, y = np.ones((4, 4), np.float32), np.arange(4) % 3
    m.fit(x, y, verbose=0)
    m.add(layers.Activation("linear"))
    m.fit(x, y, verbose=0)
    assert m.optimizer.iterations == 2  # (its state went on)
    m.add(layers.Dense(3, activation="softmax"))
    with pytest.raises(ValueError, match="holds no state for 2 of the weights.*added since"):
        m.fit(x, y, verbose=0)
    m.compile("adam", "sparse_categorical_crossentropy")
    m.fit(x, y, verbose=0)
    assert m.optimizer.iterations == 1


def test_one_image_without_batch_axis_says_add_it(compiled):
    with pytest.raises(ValueError, match=r"add the batch axis: x\[None\]"):
        compiled.predict(np.zeros((28, 28, 1), np.float32), verbose=0)


def test_small_api_edges():
    m = tiny_model()
    m.compile("sgd", "sparse_categorical_crossentropy", metrics="accuracy")
    assert m.metrics == ["accuracy"]
    x, y = tiny_data(4)
    for bad in (2.5, -1, True):
        with pytest.raises(ValueError, match="epochs must be a non-negative int"):
            m.fit(x, y, epochs=bad, verbose=0)
    assert m.fit(x, y, epochs=0, verbose=0).history == {}
    with pytest.raises(ValueError, match="already has a layer named 'dense'"):
        models.Sequential([layers.Dense(2, name="dense"), layers.Dense(2, name="dense")])
    twice = layers.Dense(2)
    with pytest.raises(ValueError, match="already in this model.*create a new one.*functional API"):
        models.Sequential([layers.Input((2,)), twice, twice])
    for bad in (1.5, -1):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            utils.set_random_seed(bad)
    with pytest.raises(ValueError, match="rho must be in"):
        optimizers.RMSprop(rho=2)
    with pytest.raises(ValueError, match="beta_2 must be in"):
        optimizers.Adam(beta_2=1.0)
    out = m.layers[0](x.tolist())  # lists are converted, as Keras does
    assert out.dtype == np.float32 and out.shape == (4, 6, 6, 4)
    with pytest.raises(ValueError, match=r"batch dimension first"):
        models.Sequential([layers.Dense(2)]).build((4,))


def test_validation_runs_the_test_hooks():
    calls = []

    class Spy(callbacks.Callback):
        def on_test_begin(self, logs=None):
            calls.append("test_begin")

        def on_test_end(self, logs=None):
            calls.append(("test_end", sorted(logs)))

    m = tiny_model()
    m.compile("sgd", "sparse_categorical_crossentropy", ["accuracy"])
    x, y = tiny_data(20)
    m.fit(x, y, batch_size=5, epochs=2, verbose=0, validation_split=0.2, callbacks=[Spy()])
    assert calls == ["test_begin", ("test_end", ["accuracy", "loss"])] * 2


@pytest.mark.parametrize("validation_batch_size, batches", [(None, 2), (3, 3), (8, 1)])
def test_validation_batch_size_sets_the_validation_batches(validation_batch_size, batches):
    """fit(validation_batch_size=...) as Keras: the validation arrays go through evaluate in batches of that size
    (it was ignored: the training batch size), by default the training batch size."""
    sizes = []

    class Spy(callbacks.Callback):
        def on_test_batch_begin(self, batch, logs=None):
            sizes.append(batch)

    m = tiny_model()
    m.compile("sgd", "sparse_categorical_crossentropy")
    x, y = tiny_data(20)
    m.fit(x, y, batch_size=4, verbose=0, validation_data=(x[:7], y[:7]), validation_batch_size=validation_batch_size,
          callbacks=[Spy()])
    assert sizes == list(range(batches))
    with pytest.raises(ValueError, match="validation_batch_size must be a positive int"):
        m.fit(x, y, verbose=0, validation_data=(x, y), validation_batch_size=0)


def test_a_failed_build_with_a_shape_leaves_the_model_usable():
    m = models.Sequential([layers.Conv2D(2, 3), layers.Flatten(), layers.Dense(3, activation="softmax")])
    with pytest.raises(ValueError, match="larger than its 2x2 input"):
        m.build((None, 2, 2, 1))
    m.compile("sgd", "sparse_categorical_crossentropy")
    x, y = tiny_data(4)
    m.fit(x, y, verbose=0)
    assert m.input_shape == (None, 8, 8, 1)
    m.build((None, 8, 8, 1))  # the same shape again: nothing to do
    with pytest.raises(ValueError, match=r"built for inputs \(8, 8, 1\), not \(9, 9, 1\)"):
        m.build((None, 9, 9, 1))


# ===================================================================================== the fused training step
@pytest.mark.parametrize("activation", ["relu", None])
def test_training_runs_conv_and_pool_as_one_op_with_the_unfused_gradients(activation, monkeypatch):
    """A Conv2D followed by MaxPooling2D((2, 2)) trains as one op (layers.ConvPool, ops.conv2d_maxpool_*): the
    step's loss and every weight gradient match the layers run one by one; inference keeps the layers."""
    utils.set_random_seed(4)
    m = models.Sequential([
        layers.Conv2D(4, 3, activation=activation, input_shape=(17, 17, 2)),  # 15x15: a row no window reads
        layers.MaxPooling2D(2),
        layers.Conv2D(6, 2, activation="relu"),
        layers.MaxPooling2D(2, strides=1),  # not fused: stride 1
        layers.Conv2D(5, 3, activation="relu", use_bias=False),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(3, activation="softmax")])
    m.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 17, 17, 2)).astype(np.float32)
    y = utils.to_categorical(rng.integers(0, 3, 6), 3)
    m.build()
    m._pack_weights()
    kinds = [tuple(type(n.layer).__name__ for n in step) for step in m.graph.steps(True)]
    assert kinds == [("Conv2D", "MaxPooling2D"), ("Conv2D",), ("MaxPooling2D",), ("Conv2D", "MaxPooling2D"),
                     ("Flatten",), ("Dense",)]
    assert all(len(step) == 1 for step in m.graph.steps(False))  # inference runs the layers one by one

    def step():
        m._grads[...] = 0
        loss, _ = m._forward_backward(x, y, 1.0)
        return float(loss), m._grads.copy()

    loss_fused, g_fused = step()
    monkeypatch.setattr(models.graph, "fusable_pool", lambda conv, pool: False)
    m.graph._plans.clear()
    m._contexts_cache.clear()
    assert all(len(s) == 1 for s in m.graph.steps(True))
    loss_plain, g_plain = step()
    np.testing.assert_allclose(loss_fused, loss_plain, rtol=1e-5)
    assert np.abs(g_plain).max() > 0
    np.testing.assert_allclose(g_fused, g_plain, rtol=1e-4, atol=1e-6 * np.abs(g_plain).max())


def test_logs_are_ordered_by_name_as_keras_3_orders_them():
    m = models.Sequential([layers.Input((4,)), layers.Dense(3, activation="softmax")])
    m.compile("rmsprop", "sparse_categorical_crossentropy", metrics=["accuracy"])
    x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
    history = m.fit(x, y, validation_data=(x, y), verbose=0)
    assert list(history.history) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert list(m.evaluate(x, y, return_dict=True, verbose=0)) == ["accuracy", "loss"]
    loss, accuracy = m.evaluate(x, y, verbose=0)  # the list: loss first, as Keras
    assert accuracy == 1.0 and loss > 0


def test_building_a_sequential_model_spends_a_functional_name_as_keras():
    """(Keras 3's behaviour, checked against Keras in tests/test_keras_oracle.py.)"""
    utils.clear_session()
    aug = models.Sequential([layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)])
    inputs = layers.Input((8, 8, 3))
    assert models.Model(inputs, layers.Flatten()(aug(inputs))).name == "functional_1"
    utils.clear_session()
    s = models.Sequential([layers.Input((4,)), layers.Dense(2)])
    s.add(layers.Dense(3))
    inputs = layers.Input((4,))
    assert models.Model(inputs, layers.Dense(2)(inputs)).name == "functional_2"


def test_kerass_other_compile_arguments():
    """compile(jit_compile=True) (keras.io's older examples), run_eagerly and auto_scale_loss are accepted and change
    nothing; what gpucnn cannot do is refused by name; keras.backend.clear_session restarts the default names."""
    from gpucnn import backend

    m = tiny_model()
    m.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=True, run_eagerly=True,
              auto_scale_loss=False, steps_per_execution=1)
    assert m.metrics == ["accuracy"]
    with pytest.raises(NotImplementedError, match="loss_weights"):
        m.compile("sgd", "sparse_categorical_crossentropy", loss_weights=[1.0])
    with pytest.raises(NotImplementedError, match="steps_per_execution=4"):
        m.compile("sgd", "sparse_categorical_crossentropy", steps_per_execution=4)
    backend.clear_session()
    assert layers.Dense(2).name == "dense"
    with pytest.raises(AttributeError, match="gpucnn.backend has no 'set_value'.*It has: clear_session"):
        backend.set_value


def test_train_test_and_predict_on_batch_as_keras():
    """train_on_batch is one step of fit (same weights as fit over that one batch) and returns that batch's loss
    and accuracy; test_on_batch and predict_on_batch are evaluate and predict over the one batch."""
    x, y = tiny_data(12)
    results = []
    for how in ("fit", "on_batch"):
        utils.set_random_seed(6)
        m = tiny_model()
        m.compile(optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy", ["accuracy"])
        if how == "fit":
            m.fit(x, y, batch_size=12, epochs=2, shuffle=False, verbose=0)
        else:
            first = m.train_on_batch(x, y)
            second = m.train_on_batch(x, y, return_dict=True)
            assert isinstance(first, list) and len(first) == 2 and sorted(second) == ["accuracy", "loss"]
        results.append(m)
    for a, b in zip(results[0].get_weights(), results[1].get_weights()):
        np.testing.assert_array_equal(a, b)
    m = results[1]
    assert m.optimizer.iterations == 2
    assert m.test_on_batch(x, y) == m.evaluate(x, y, batch_size=12, verbose=0)
    np.testing.assert_array_equal(m.predict_on_batch(x), m.predict(x, verbose=0))
    m.compile(optimizers.SGD(1e30), "sparse_categorical_crossentropy")
    with pytest.raises(models.TrainingDivergedError, match="in train_on_batch"):
        for _ in range(5):
            m.train_on_batch(x * 1e10, y)


def test_model_building_edges_as_keras():
    """trainable=False given to Sequential or Model freezes its layers (it was stored and ignored: they trained);
    a Keras-style call() layer, dict inputs/outputs are refused by name; clone_model / to_json / model_from_json;
    a list of one row is one sample; a layer of one's own takes add_weight."""
    x = np.random.default_rng(0).random((8, 3)).astype(np.float32)
    y = np.arange(8) % 2
    for frozen in (models.Sequential([layers.Input((3,)), layers.Dense(2, activation="softmax")], trainable=False),
                   models.Model(*(lambda i: (i, layers.Dense(2, activation="softmax")(i)))(layers.Input((3,))),
                                trainable=False)):
        before = frozen.get_weights()[0].copy()
        frozen.compile("sgd", "sparse_categorical_crossentropy")
        frozen.fit(x, y, verbose=0)
        assert not frozen.trainable_weights and np.array_equal(before, frozen.get_weights()[0])
        assert not type(frozen).from_config(frozen.get_config()).trainable
    # Keras: the flag is the model's own view; the same layers in another model still train (a frozen wrapper)
    base = models.Sequential([layers.Input((3,)), layers.Dense(4), layers.Dense(2, activation="softmax")])
    wrapper = models.Model(base.inputs, base.outputs, trainable=False)
    assert len(base.trainable_weights) == 4 and not wrapper.trainable_weights
    inp = layers.Input((3,))
    outer = models.Model(inp, layers.Dense(2, activation="softmax", name="head")(wrapper(inp)))
    assert [w.path for w in outer.trainable_weights] == ["head/kernel", "head/bias"]
    kept = base.get_weights()
    outer.compile("sgd", "sparse_categorical_crossentropy")
    outer.fit(x, y, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(kept, base.get_weights()))
    base.compile("sgd", "sparse_categorical_crossentropy")
    base.fit(x, y, verbose=0)
    assert not np.array_equal(kept[0], base.get_weights()[0])

    class KerasStyle(layers.Layer):
        def call(self, t):
            return t
    with pytest.raises(NotImplementedError, match="KerasStyle is a Keras-style layer.*call"):
        KerasStyle()
    inp = layers.Input((3,))
    with pytest.raises(NotImplementedError, match="dict of outputs"):
        models.Model(inp, {"a": layers.Dense(2)(inp)})
    m = models.Sequential([layers.Input((3,)), layers.Dense(2)])
    clone = models.clone_model(m)
    assert clone.count_params() == m.count_params() and clone.layers[0] is not m.layers[0]
    again = models.model_from_json(m.to_json())
    assert [type(layer) for layer in again.layers] == [type(layer) for layer in m.layers]
    assert m.predict(x[:1].tolist(), verbose=0).shape == (1, 2) and m.predict([x[:2]], verbose=0).shape == (2, 2)
    with pytest.raises(AttributeError, match="gpucnn.models has no 'foo'.*It has: Model"):
        models.foo

    class Scale(layers.Layer):
        def _build(self, shape):
            self.add_weight(shape=(shape[-1],), initializer="ones", name="scale")
            return shape

        def forward(self, t, training, ctx):
            ctx["x"] = t
            return t * self.weights[0]

        def backward(self, dy, ctx):
            self.grads[0][...] = (dy * ctx["x"]).sum(0)
            return dy * self.weights[0]
    own = models.Sequential([layers.Input((3,)), Scale(), layers.Dense(2)])
    assert own.count_params() == 11
    np.testing.assert_array_equal(own.layers[0].scale.numpy(), np.ones(3, np.float32))


def test_a_weight_that_overflows_stops_training_though_the_loss_stays_finite():
    """Inputs of 1e20 (finite float32, never scaled): BatchNormalization's batch statistics normalize them, so the
    loss stays finite, but its moving variance overflows to infinity and predict would give a constant. fit names
    the weight at the end of the epoch instead of training on."""
    x = np.random.default_rng(0).random((8, 8, 8, 3)).astype(np.float32) * 1e20
    y = np.arange(8) % 2
    model = models.Sequential([layers.Input((8, 8, 3)), layers.BatchNormalization(name="bn"), layers.Flatten(),
                               layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    seen = []
    with pytest.raises(models.TrainingDivergedError,
                       match="moving_variance of layer 'bn' is no longer finite after epoch 1.*inputs are scaled"):
        model.fit(x, y, batch_size=4, epochs=3, verbose=0,
                  callbacks=[callbacks.LambdaCallback(on_batch_end=lambda b, logs: seen.append(logs["loss"]))])
    assert len(seen) == 2 and np.isfinite(seen).all()  # the loss alone would not have told


def test_set_weights_checks_every_array_before_it_sets_any():
    model = models.Sequential([layers.Input((4,)), layers.Dense(3), layers.Dense(2)])
    before = model.get_weights()
    new = [w + 1 for w in before]
    new[-1] = np.zeros(99, np.float32)  # the last array is wrong
    with pytest.raises(ValueError, match="bias must have shape"):
        model.set_weights(new)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_a_negative_moving_variance_is_refused():
    bn = layers.BatchNormalization()
    models.Sequential([layers.Input((3,)), bn])
    gamma, beta, mean, var = bn.get_weights()
    with pytest.raises(ValueError, match="moving_variance must be >= 0"):
        bn.set_weights([gamma, beta, mean, var - 2])
    np.testing.assert_array_equal(bn.get_weights()[3], var)


def test_a_softmax_or_categorical_loss_over_one_unit_is_refused():
    """A softmax over one unit is always 1: loss 0 and accuracy 1 whatever the data (Keras only warns)."""
    x, y = np.zeros((8, 4), np.float32), (np.arange(8) % 2).reshape(-1, 1).astype(np.float32)
    for activation, loss in (("sigmoid", "categorical_crossentropy"), ("softmax", "categorical_crossentropy"),
                             (None, "sparse_categorical_crossentropy"), ("softmax", "binary_crossentropy")):
        model = models.Sequential([layers.Input((4,)), layers.Dense(1, activation=activation)])
        model.compile("adam", loss, metrics=["accuracy"])
        with pytest.raises(ValueError, match="one (unit|output).*Dense\\(1, activation='sigmoid'\\)"):
            model.fit(x, y if loss != "sparse_categorical_crossentropy" else y[:, 0] * 0, verbose=0)
    model = models.Sequential([layers.Input((4,)), layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    assert np.isfinite(model.fit(x, y, verbose=0).history["loss"][0])


def test_an_optimizer_trains_on_across_models_of_the_same_weights_and_refuses_weights_it_never_saw():
    """Keras's optimizer keeps a state per variable: a model of the same layers (Model(a.inputs, a.outputs), a
    Sequential wrapping a) trains on from it exactly as the first would have; a model with a weight the optimizer
    never trained (another model, a new head) is refused, as Keras refuses an unknown variable."""
    x, y = np.random.default_rng(0).random((8, 4)).astype(np.float32), np.arange(8) % 2

    def model(seed=0):
        utils.set_random_seed(seed)
        return models.Sequential([layers.Input((4,)), layers.Dense(3, activation="relu"),
                                  layers.Dense(2, activation="softmax")])
    straight = model()
    straight.compile(optimizers.Adam(0.1), "sparse_categorical_crossentropy")
    straight.fit(x, y, batch_size=4, epochs=3, shuffle=False, verbose=0)
    first = model()
    opt = optimizers.Adam(0.1)
    first.compile(opt, "sparse_categorical_crossentropy")
    first.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    same = models.Model(first.inputs, first.outputs)
    same.compile(opt, "sparse_categorical_crossentropy")
    same.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    wrapped = models.Sequential([layers.Input((4,)), first])
    wrapped.compile(opt, "sparse_categorical_crossentropy")
    wrapped.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert opt.iterations == 6
    for a, b in zip(first.get_weights(), straight.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    other = model(1)
    other.compile(opt, "sparse_categorical_crossentropy")  # (Keras too refuses it at the step, not at compile)
    with pytest.raises(ValueError, match="has trained model .* \\(6 steps\\) and holds no state for 4 of the "
                                         "weights.*kernel of layer.*Compile with a new optimizer"):
        other.fit(x, y, batch_size=4, verbose=0)
    assert opt.iterations == 6
    head = models.Sequential([first, layers.Dense(2, activation="softmax")])
    head.compile(opt, "sparse_categorical_crossentropy")  # (not built yet: checked when it trains)
    with pytest.raises(ValueError, match="holds no state for 2 of the weights"):
        head.fit(x, y, batch_size=4, verbose=0)
    assert opt.iterations == 6
    third, fourth = model(2), model(3)
    shared = optimizers.Adam()  # compiled with two models before either trains: the first to train takes it
    third.compile(shared, "sparse_categorical_crossentropy")
    fourth.compile(shared, "sparse_categorical_crossentropy")
    third.fit(x, y, batch_size=4, verbose=0)
    with pytest.raises(ValueError, match=f"has trained model '{third.name}' .*holds no state"):
        fourth.fit(x, y, batch_size=4, verbose=0)
    shared._stepped_by = lambda: None  # that model gone (a weak reference): the refusal still names it
    with pytest.raises(ValueError, match=f"has trained model '{third.name}' .*holds no state"):
        fourth.fit(x, y, batch_size=4, verbose=0)


def test_trainable_takes_true_or_false_only():
    """trainable = "False" would read as true (and the layer train on): refused, as anything not a bool."""
    dense = layers.Dense(2)
    model = models.Sequential([layers.Input((3,)), dense])
    for value in ("False", None, 2, 1.0, [False]):
        with pytest.raises(TypeError, match="trainable must be True or False"):
            dense.trainable = value
        with pytest.raises(TypeError, match="trainable must be True or False"):
            model.trainable = value
        with pytest.raises(TypeError, match="trainable must be True or False"):
            layers.Dense(2, trainable=value)
    assert dense.trainable and model.trainable
    dense.trainable = np.bool_(False)
    assert dense.trainable is False and model.trainable_weights == []
    dense.trainable = 1  # Keras takes 1 and 0 as True and False
    assert dense.trainable is True


def test_inputs_and_labels_given_together_or_images_of_two_sizes_are_named():
    model = models.Sequential([layers.Input((4, 4, 1)), layers.Flatten(), layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = np.zeros((6, 4, 4, 1), np.float32), np.arange(6) % 2
    for call in (lambda: model.fit((x, y), verbose=0), lambda: model.fit([x, y], verbose=0),
                 lambda: model.predict((x, y), verbose=0)):
        with pytest.raises(ValueError, match=r"x is a (tuple|list) of two arrays, \(6, 4, 4, 1\) and \(6,\).*fit\(x, y\)"):
            call()
    images = list(x)
    images[4] = np.zeros((5, 4, 1), np.float32)
    with pytest.raises(ValueError, match=r"item 4 has shape \(5, 4, 1\), most have \(4, 4, 1\)"):
        model.fit(images, y, verbose=0)
    with pytest.raises(ValueError, match=r"item 0 has shape \(4, 4, 1\), item 1 \(4, 3, 1\)"):  # two sizes
        model.predict([x[0], np.zeros((4, 3, 1), np.float32)], verbose=0)
    with pytest.raises(ValueError, match="y is missing.*fit\\(x, y\\)"):
        model.fit(x, None, verbose=0)
    assert model.predict(list(x), verbose=0).shape == (6, 2)  # a list of equal images is still a batch


def test_categorical_label_smoothing_trains_on_kerass_targets():
    """CategoricalCrossentropy(label_smoothing=s) takes y·(1 − s) + s/K as its targets (Keras's formula): its loss
    and one SGD step, against float64."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 6)]
    model = models.Sequential([layers.Input((5,)), layers.Dense(4, activation="softmax")])
    model.compile(optimizers.SGD(0.5), losses.CategoricalCrossentropy(label_smoothing=0.2),
                  metrics=["accuracy"])
    w, b = (v.astype(np.float64) for v in model.get_weights())
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    target = y * 0.8 + 0.2 / 4
    loss, accuracy = model.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(loss, -(target * np.log(p)).sum(1).mean(), rtol=1e-5)
    assert accuracy == np.mean(p.argmax(1) == y.argmax(1))  # counted against the labels' own classes
    model.fit(x, y, batch_size=6, verbose=0)
    dz = (p - target) / 6
    np.testing.assert_allclose(model.get_weights()[0], w - 0.5 * x.astype(np.float64).T @ dz, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="takes no label_smoothing.*CategoricalCrossentropy\\(label_smoothing"):
        losses.SparseCategoricalCrossentropy(label_smoothing=0.1)


def test_label_smoothing_is_applied_once_on_every_path_of_fit():
    """The smoothed targets are made where the loss reads the labels, so labels checked twice (arrays through
    steps_per_epoch, validation_split, validation_steps) are still smoothed once: with a rate of 0 the weights never
    move and every loss is the one of the smoothed targets."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 16)]
    model = models.Sequential([layers.Input((5,)), layers.Dense(3, activation="softmax")])
    model.compile(optimizers.SGD(0.0), losses.CategoricalCrossentropy(label_smoothing=0.3))
    w, b = (v.astype(np.float64) for v in model.get_weights())
    z = x @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    per_sample = -((y * 0.7 + 0.1) * np.log(p)).sum(1)
    whole, last_half = per_sample.mean(), per_sample[8:].mean()
    runs = [model.fit(x, y, batch_size=4, steps_per_epoch=4, verbose=0).history["loss"][0],
            model.fit(x, y, batch_size=4, validation_split=0.5, verbose=0).history["val_loss"][0],
            model.fit(x, y, batch_size=4, validation_data=(x, y), validation_steps=4, verbose=0).history["val_loss"][0],
            model.fit(x[:8], y[:8], batch_size=4, validation_data=(x[8:], y[8:]), verbose=0).history["val_loss"][0],
            model.evaluate(x, y, verbose=0), model.test_on_batch(x, y),
            model.fit(x, y, batch_size=16, verbose=0).history["loss"][0]]  # two processes where there are 2 cores
    np.testing.assert_allclose(runs, [whole, last_half, whole, last_half, whole, whole, whole], rtol=1e-5)


def test_terminate_on_nan_still_ends_fit_quietly_when_the_weights_overflowed():
    """A step with a finite loss overflows the weights, the next loss is NaN, TerminateOnNaN stops: fit returns as
    Keras's does (the weights check after the epoch is for runs nothing stopped)."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), (rng.random((64, 1)) > 0.5).astype(np.float32)
    stopped_with_overflow = 0
    for seed in range(4):
        utils.set_random_seed(seed)
        model = models.Sequential([layers.Input((6,)), layers.Dense(16, activation="relu"),
                                   layers.Dense(1, activation="sigmoid")])
        model.compile(optimizers.SGD(learning_rate=1e37, momentum=0.9), "binary_crossentropy")
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[callbacks.TerminateOnNaN()])
        assert len(history.history["loss"]) == 1 and not np.isfinite(history.history["loss"][0])
        stopped_with_overflow += not all(np.isfinite(w).all() for w in model.get_weights())
    assert stopped_with_overflow  # the case this is about happened


def test_an_optimizer_keeps_each_weights_state_wherever_it_was_laid_out(tmp_path):
    """The optimizer records where its state sits: another optimizer in between (a model recompiled with one, then
    with the first again), a frozen layer, another model of the same layers taking it, or a model saved while
    another holds the optimizer — each weight's state and the step count go on as Keras's per-variable state."""
    x, y = np.random.default_rng(0).random((8, 4)).astype(np.float32), np.arange(8) % 2

    def model(seed=0):
        utils.set_random_seed(seed)
        return models.Sequential([layers.Input((4,)), layers.Dense(3, activation="relu", name=f"d{seed}"),
                                  layers.Dense(2, activation="softmax", name=f"out{seed}")])
    a = model()
    first = optimizers.Adam(0.1)
    a.compile(first, "sparse_categorical_crossentropy")
    a.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    moments = {name: np.array(values) for name, values in first.state.items()}
    a.layers[0].trainable = False
    a.compile(optimizers.Adam(0.1), "sparse_categorical_crossentropy")  # another optimizer, another layout
    a.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    a.layers[0].trainable = True
    a.compile(first, "sparse_categorical_crossentropy")  # the first again: its state and steps, not a new start
    assert first.iterations == 2
    for name, values in moments.items():
        np.testing.assert_array_equal(first.state[name], values)
    a.layers[0].trainable = False
    b = models.Model(a.inputs, a.outputs)  # the same layers, one frozen: takes the optimizer, parks d0's state
    b.compile(first, "sparse_categorical_crossentropy")
    b.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    assert first.iterations == 4
    a.layers[0].trainable = True
    a.save(tmp_path / "a.gpucnn")  # b holds the optimizer: a's file lays its state out over a's weights
    loaded = models.load_model(tmp_path / "a.gpucnn")
    a.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=4, shuffle=False, verbose=0)
    for got, want in zip(loaded.get_weights(), a.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_loss_per_output_is_refused_as_what_it_is():
    """Keras's form for a model of several outputs, a list or dict of losses, said as such (it read "unknown loss
    [...]; gpucnn knows [...]", which names the losses it was given)."""
    import gpucnn as keras
    inputs = keras.Input((4,))
    two = keras.Model(inputs, [keras.layers.Dense(3, activation="softmax")(inputs), keras.layers.Dense(1)(inputs)])
    for loss in (["sparse_categorical_crossentropy", "binary_crossentropy"], {"dense": "binary_crossentropy"}):
        with pytest.raises(NotImplementedError, match="a model of 2 outputs takes a loss per output in Keras; gpucnn "
                                                      "does not train such models \\(predict works\\)"):
            two.compile("sgd", loss)
    one = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(inputs))
    for loss in (["sparse_categorical_crossentropy"], ("sparse_categorical_crossentropy",),  # Keras takes these
                 {"out": "sparse_categorical_crossentropy"}, [losses.SparseCategoricalCrossentropy()]):
        one.compile("sgd", loss)
        assert type(one.loss) is losses.SparseCategoricalCrossentropy
    with pytest.raises(ValueError, match="the model has one output, so one loss \\(got 2\\)"):
        one.compile("sgd", ["sparse_categorical_crossentropy"] * 2)
    with pytest.raises(ValueError, match="the dict's key must be the output layer's name 'out'"):
        one.compile("sgd", {"dense": "sparse_categorical_crossentropy"})


def test_label_smoothings_share_of_each_class_is_divided_in_float32():
    """Keras divides s by its float32 class count (``label_smoothing / num_classes``, a float32 tensor), so the
    smoothed targets' s / K is float32(s) / float32(K) (as its TensorFlow and JAX backends round it), which differs
    from float32(s / K) in the last bit for about a quarter of (s, K) (s = 0.3, K = 5 here): the plain path's
    targets and the fast path's constants (the loss's ``smoothing``) both so."""
    s, k = 0.3, 5
    assert np.float32(s) / np.float32(k) != np.float32(s / k)  # (a case where the two roundings differ)
    y = np.eye(k, dtype=np.float32)[[0, 3]]
    targets = losses.CategoricalCrossentropy(label_smoothing=s)._targets(y)
    np.testing.assert_array_equal(targets, y * np.float32(1 - s) + np.float32(s) / np.float32(k))
    assert losses.CategoricalCrossentropy(label_smoothing=s).smoothing(k) == (np.float32(1 - s),
                                                                             np.float32(s) / np.float32(k))
    assert losses.BinaryCrossentropy(label_smoothing=s).smoothing(1) == (np.float32(1 - s), np.float32(0.5 * s))
