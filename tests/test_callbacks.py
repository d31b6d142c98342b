"""Callbacks as Keras's: the order of hooks in fit, EarlyStopping, ModelCheckpoint, TerminateOnNaN."""
import math

import numpy as np
import pytest

from gpucnn import callbacks, layers, models, optimizers
from gpucnn.callbacks import EarlyStopping, ModelCheckpoint, TerminateOnNaN


pytestmark = pytest.mark.usefixtures("numpy_engine")


def tiny_model():
    model = models.Sequential([layers.Conv2D(2, 3, activation="relu", input_shape=(6, 6, 1)),
                               layers.Flatten(), layers.Dense(3, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy", ["accuracy"])
    return model


def tiny_data(n=16):
    r = np.random.default_rng(0)
    return r.random((n, 6, 6, 1)).astype(np.float32), r.integers(0, 3, n)


class Script(callbacks.Callback):
    """Overwrites the epoch's logs with scripted values (callbacks after it see them) and keeps a copy
    of the weights at the end of every epoch."""

    def __init__(self, **series):
        super().__init__()
        self.series, self.weights = series, []

    def on_epoch_end(self, epoch, logs=None):
        for key, values in self.series.items():
            logs[key] = values[epoch]
        self.weights.append(self.model.get_weights())


class FakeModel:
    def __init__(self):
        self.stop_training, self.weights = False, [np.zeros(1)]

    def get_weights(self):
        return [w.copy() for w in self.weights]

    def set_weights(self, weights):
        self.weights = [w.copy() for w in weights]


def drive(cb, values, key="val_loss"):
    """Feed ``values`` epoch by epoch as Keras's fit would; return the epoch at which it stopped."""
    model = FakeModel()
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, value in enumerate(values):
        model.weights = [np.array([float(epoch)])]
        cb.on_epoch_end(epoch, {key: value})
        if model.stop_training:
            break
    cb.on_train_end()
    return epoch, model


# ===================================================================================== hook order
def test_fit_calls_the_hooks_in_keras_order():
    calls = []

    class Recorder(callbacks.Callback):
        def __getattribute__(self, name):
            if name.startswith("on_"):
                calls.append(name)
            return object.__getattribute__(self, name)

    tiny_model().fit(*tiny_data(8), batch_size=4, epochs=2, verbose=0, callbacks=[Recorder()])
    epoch = ["on_epoch_begin"] + ["on_train_batch_begin", "on_train_batch_end"] * 2 + ["on_epoch_end"]
    assert calls == ["on_train_begin"] + epoch * 2 + ["on_train_end"]


# ===================================================================================== EarlyStopping
def test_early_stopping_waits_patience_epochs_without_improvement():
    assert drive(EarlyStopping(patience=2), [1.0, 0.9, 0.95, 0.92, 0.8])[0] == 3
    assert drive(EarlyStopping(patience=0), [1.0, 0.9, 0.95, 0.5])[0] == 2
    assert drive(EarlyStopping(patience=2), [1.0, 0.9, 0.8, 0.7, 0.6])[0] == 4  # never stops


def test_early_stopping_min_delta_mode_and_baseline():
    # improvements smaller than min_delta do not count
    assert drive(EarlyStopping(patience=2), [1.0, 0.95, 0.91, 0.5])[0] == 3
    assert drive(EarlyStopping(min_delta=0.1, patience=2), [1.0, 0.95, 0.91, 0.5])[0] == 2
    # accuracy should rise: mode auto picks "max"
    assert drive(EarlyStopping("val_accuracy", patience=1), [0.5, 0.6, 0.7, 0.65],
                 key="val_accuracy")[0] == 3
    assert drive(EarlyStopping("val_accuracy", mode="min", patience=1), [0.5, 0.6, 0.7, 0.65],
                 key="val_accuracy")[0] == 1
    assert drive(EarlyStopping("val_loss", mode="max", patience=0), [1.0, 2.0, 1.5])[0] == 2
    # epochs that improve but miss the baseline do not reset the wait
    assert drive(EarlyStopping(patience=2), [1.0, 0.9, 0.95, 0.3])[0] == 3
    assert drive(EarlyStopping(patience=2, baseline=0.5), [1.0, 0.9, 0.95, 0.3])[0] == 2
    assert drive(EarlyStopping(patience=2, baseline=0.5), [1.0, 0.45, 0.46, 0.47])[0] == 3


def test_early_stopping_restores_the_best_weights_at_the_end():
    epoch, model = drive(EarlyStopping(patience=2, restore_best_weights=True), [1.0, 0.5, 0.7, 0.6])
    assert epoch == 3 and model.weights[0][0] == 1.0  # the weights of epoch 1 (0-based)
    _, model = drive(EarlyStopping(patience=9, restore_best_weights=True), [1.0, 0.5, 0.7])
    assert model.weights[0][0] == 1.0  # Keras 3: restored even when training ran to its end
    _, model = drive(EarlyStopping(patience=2), [1.0, 0.5, 0.7, 0.6])
    assert model.weights[0][0] == 3.0  # without the option the last weights stay


def test_early_stopping_in_fit_restores_the_best_epochs_weights():
    script = Script(val_loss=[0.5, 0.3, 0.4, 0.45, 0.2, 0.1])
    stop = EarlyStopping(patience=2, restore_best_weights=True)
    model = tiny_model()
    history = model.fit(*tiny_data(), batch_size=4, epochs=6, verbose=0, callbacks=[script, stop],
                        validation_data=tiny_data(8))
    assert history.epoch == [0, 1, 2, 3] and stop.stopped_epoch == 3 and stop.best_epoch == 1
    assert history.history["val_loss"] == [0.5, 0.3, 0.4, 0.45]
    for got, best in zip(model.get_weights(), script.weights[1]):
        np.testing.assert_array_equal(got, best)
    assert not np.array_equal(script.weights[1][0], script.weights[3][0])  # training did move them


def test_early_stopping_without_the_monitored_value_warns_and_goes_on():
    with pytest.warns(UserWarning, match="'val_loss', which is not in the logs; available: \\['loss'\\]"):
        assert drive(EarlyStopping(patience=0), [1.0, 2.0, 3.0], key="loss")[0] == 2


def test_early_stopping_refuses_an_unknown_mode_or_an_ambiguous_monitor():
    with pytest.raises(ValueError, match="mode must be 'auto', 'min' or 'max'"):
        EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="pass mode='min' or mode='max'"):
        EarlyStopping(monitor="val_f1")
    EarlyStopping(monitor="val_f1", mode="max")


# ===================================================================================== ModelCheckpoint
def test_checkpoint_best_only_writes_only_on_improvement(tmp_path):
    script = Script(val_loss=[0.5, 0.6, 0.4, 0.4, 0.45])
    pattern = str(tmp_path / "ckpt-{epoch:02d}-{val_loss:.2f}.gpucnn")
    model = tiny_model()
    model.fit(*tiny_data(), batch_size=4, epochs=5, verbose=0, validation_data=tiny_data(8),
              callbacks=[script, ModelCheckpoint(pattern, save_best_only=True)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-01-0.50.gpucnn", "ckpt-03-0.40.gpucnn"]
    best = models.load_model(tmp_path / "ckpt-03-0.40.gpucnn")
    for got, kept in zip(best.get_weights(), script.weights[2]):
        np.testing.assert_array_equal(got, kept)


def test_checkpoint_every_epoch_weights_only_and_max_mode(tmp_path, capsys):
    model = tiny_model()
    model.fit(*tiny_data(), batch_size=4, epochs=3, verbose=0, callbacks=[
        ModelCheckpoint(str(tmp_path / "w{epoch}.npz"), save_weights_only=True),
        ModelCheckpoint(str(tmp_path / "sub" / "best.gpucnn"), monitor="accuracy", save_best_only=True,
                        verbose=1)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "w1.npz", "w2.npz", "w3.npz"]
    other = tiny_model()
    other.load_weights(tmp_path / "w3.npz")
    np.testing.assert_array_equal(other.get_weights()[0], model.get_weights()[0])
    assert "Epoch 1: accuracy improved from -inf to" in capsys.readouterr().out
    assert (tmp_path / "sub" / "best.gpucnn").exists()


def test_checkpoint_names_a_missing_log_key(tmp_path):
    model = tiny_model()
    with pytest.raises(KeyError, match="val_loss.*not in the logs"):
        model.fit(*tiny_data(), batch_size=8, epochs=1, verbose=0,
                  callbacks=[ModelCheckpoint(str(tmp_path / "{val_loss:.2f}.gpucnn"))])
    with pytest.warns(UserWarning, match="only with 'val_loss' in the logs"):
        model.fit(*tiny_data(), batch_size=8, epochs=1, verbose=0,
                  callbacks=[ModelCheckpoint(str(tmp_path / "m.gpucnn"), save_best_only=True)])
    assert list(tmp_path.iterdir()) == []


# ===================================================================================== TerminateOnNaN
@pytest.mark.parametrize("loss,stops", [(math.nan, True), (math.inf, True), (0.3, False)])
def test_terminate_on_nan_sets_stop_training(loss, stops, capsys):
    cb, model = TerminateOnNaN(), FakeModel()
    cb.set_model(model)
    cb.on_train_batch_end(4, {"loss": loss})
    assert model.stop_training is stops
    assert ("Batch 4: Invalid loss, terminating training" in capsys.readouterr().out) is stops


def test_terminate_on_nan_ends_fit_at_the_first_nan_batch():
    model = models.Sequential([layers.Conv2D(4, 3, input_shape=(6, 6, 1)), layers.Flatten(),
                               layers.Dense(8), layers.Dense(3, activation="softmax")])
    model.compile(optimizers.SGD(learning_rate=1e6), "sparse_categorical_crossentropy")
    losses = []

    class Seen(callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(logs["loss"])

    history = model.fit(*tiny_data(64), batch_size=8, epochs=3, verbose=0,
                        callbacks=[TerminateOnNaN(), Seen()])
    assert history.epoch == [0] and len(losses) < 8
    assert not math.isfinite(losses[-1]) and all(math.isfinite(v) for v in losses[:-1])


def test_which_callbacks_make_the_fast_path_wait_after_each_step():
    from gpucnn.callbacks import Callback, CallbackList

    class Plain(Callback):
        pass

    class Looks(TerminateOnNaN):
        def on_train_batch_end(self, batch, logs=None):  # a subclass that may read the model
            pass

    lambda_style = Callback()
    lambda_style.on_train_batch_end = lambda batch, logs=None: None
    model = tiny_model()
    waits = lambda *cbs: CallbackList(list(cbs), model, {}).batch_hooks_use_model()  # noqa: E731
    assert not waits(Plain(), TerminateOnNaN(), callbacks.History())
    assert waits(Looks()) and waits(lambda_style)
