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
            if name.startswith("on_") and name not in ("on_batch_begin", "on_batch_end"):  # (forwarded to, within)
                calls.append(name)
            return object.__getattribute__(self, name)

    tiny_model().fit(*tiny_data(8), batch_size=4, epochs=2, verbose=0, callbacks=[Recorder()])
    epoch = ["on_epoch_begin"] + ["on_train_batch_begin", "on_train_batch_end"] * 2 + ["on_epoch_end"]
    assert calls == ["on_train_begin"] + epoch * 2 + ["on_train_end"]


def test_every_hook_gets_a_logs_dict_and_params_as_keras():
    """Keras passes a dict to every hook (``{}`` before there are logs): hooks that take ``logs`` without a default,
    or read it, work; predict's batch end holds the batch's outputs; evaluate and predict give params too."""
    seen = []

    class Strict(callbacks.Callback):  # no defaults: each hook must get its logs
        def on_train_begin(self, logs): seen.append(("train_begin", dict(logs)))
        def on_epoch_begin(self, epoch, logs): seen.append(("epoch_begin", dict(logs)))
        def on_train_batch_begin(self, batch, logs): seen.append(("batch_begin", dict(logs)))
        def on_test_begin(self, logs): seen.append(("test_begin", dict(logs)))
        def on_test_batch_begin(self, batch, logs): seen.append(("test_batch_begin", dict(logs)))
        def on_predict_begin(self, logs): seen.append(("predict_begin", dict(logs), dict(self.params)))
        def on_predict_batch_begin(self, batch, logs): seen.append(("predict_batch_begin", dict(logs)))
        def on_predict_batch_end(self, batch, logs): seen.append(("predict_batch_end", logs["outputs"].shape))
        def on_predict_end(self, logs): seen.append(("predict_end", dict(logs)))

    model = tiny_model()
    x, y = tiny_data(8)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, validation_data=(x, y), callbacks=[Strict()])
    model.predict(x, batch_size=5, verbose=0, callbacks=[Strict()])
    names = [s[0] for s in seen]
    for name in ("train_begin", "epoch_begin", "batch_begin", "test_begin", "test_batch_begin", "predict_begin",
                 "predict_batch_begin", "predict_end"):
        assert name in names and all(s[1] == {} for s in seen if s[0] == name and len(s) == 2)
    assert [s[1] for s in seen if s[0] == "predict_batch_end"] == [(5, 3), (3, 3)]
    assert [s[2] for s in seen if s[0] == "predict_begin"] == [{"verbose": 0, "epochs": 1, "steps": 2}]
    keys = []
    lam = callbacks.LambdaCallback(on_train_begin=lambda logs: keys.append(sorted(logs)),
                                   on_epoch_begin=lambda epoch, logs: keys.append(sorted(logs)))
    model.fit(x, y, epochs=1, verbose=0, callbacks=[lam])
    assert keys == [[], []]
    assert callbacks.CallbackList([Strict()], model=model).callbacks[0].model is model


def test_kerass_older_batch_hook_names_are_called():
    """A callback written with Keras's on_batch_begin / on_batch_end (Keras 3 still calls them from its train-batch
    hooks) is called at every training step, and counts as a batch hook that may use the model."""
    seen = []

    class Old(callbacks.Callback):
        def on_batch_begin(self, batch, logs=None):
            seen.append(("begin", batch))

        def on_batch_end(self, batch, logs=None):
            seen.append(("end", batch, sorted(logs)))

    tiny_model().fit(*tiny_data(8), batch_size=4, epochs=1, verbose=0, callbacks=[Old()])
    assert seen == [("begin", 0), ("end", 0, ["accuracy", "loss"]), ("begin", 1), ("end", 1, ["accuracy", "loss"])]
    assert callbacks.CallbackList([Old()]).batch_hooks_use_model()
    assert not callbacks.CallbackList([callbacks.History()]).batch_hooks_use_model()


def test_test_batch_end_gets_kerass_running_logs():
    """on_test_batch_end gets the running loss and metrics of the batches so far, as Keras passes them."""
    seen = []

    class Look(callbacks.Callback):
        def on_test_batch_end(self, batch, logs=None):
            seen.append(dict(logs))

    model = tiny_model()
    x, y = tiny_data(10)
    model.evaluate(x, y, batch_size=4, verbose=0, callbacks=[Look()])
    assert [sorted(s) for s in seen] == [["accuracy", "loss"]] * 3
    assert seen[-1]["loss"] == pytest.approx(model.evaluate(x, y, verbose=0)[0], rel=1e-6)
    assert seen[0]["loss"] == pytest.approx(model.evaluate(x[:4], y[:4], verbose=0)[0], rel=1e-6)


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


def test_early_stopping_refuses_an_unknown_mode_or_an_ambiguous_monitor(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'auto', 'min' or 'max'"):
        EarlyStopping(mode="up")
    model = tiny_model()
    x, y = tiny_data()
    for cb in (EarlyStopping(monitor="val_f1"), callbacks.ReduceLROnPlateau(monitor="val_f1"),
               ModelCheckpoint(tmp_path / "m.gpucnn", monitor="val_f1", save_best_only=True)):
        before = model.get_weights()
        with pytest.raises(ValueError, match="cannot tell whether 'val_f1' should rise or fall .* pass mode='min'"):
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])  # refused before any step
        for a, b in zip(before, model.get_weights()):
            np.testing.assert_array_equal(a, b)
    with pytest.warns(UserWarning, match="'val_f1', which is not in the logs"):  # given a mode, it trains
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[EarlyStopping(monitor="val_f1", mode="max")])


def test_a_subclass_that_does_not_call_on_train_begin_still_learns_the_direction():
    """Keras reads an "auto" direction lazily, at the epoch's end: a subclass whose on_train_begin does not call the
    base's works there, and here."""
    class Quiet(EarlyStopping):
        def on_train_begin(self, logs=None):
            self.wait, self.stopped_epoch, self.best_epoch, self.best, self.best_weights = 0, 0, 0, None, None

    model = tiny_model()
    model.compile("sgd", "sparse_categorical_crossentropy", ["sparse_categorical_accuracy"])
    stop = Quiet(monitor="sparse_categorical_accuracy", patience=0)
    model.fit(*tiny_data(), batch_size=4, epochs=3, verbose=0,
              callbacks=[Script(sparse_categorical_accuracy=[0.5, 0.4, 0.3]), stop])
    assert stop.stopped_epoch == 1 and stop.best == 0.5


def test_auto_mode_reads_the_models_own_metric_names_as_accuracies():
    """Keras reads an "auto" monitor's direction from the model's metric of that name: an accuracy logged under its
    own name (sparse_categorical_accuracy, an object's name=) rises."""
    from gpucnn import metrics
    x, y = tiny_data()
    for metric, key in (("sparse_categorical_accuracy", "val_sparse_categorical_accuracy"),
                        (metrics.SparseCategoricalAccuracy(name="hits"), "hits")):
        model = tiny_model()
        model.compile("sgd", "sparse_categorical_crossentropy", [metric])
        stop = EarlyStopping(monitor=key, patience=0)
        script = Script(**{key: [0.5, 0.6, 0.55, 0.7]})
        model.fit(x, y, batch_size=4, epochs=4, verbose=0, validation_data=(x, y), callbacks=[script, stop])
        assert stop.stopped_epoch == 2 and stop.best == 0.6  # rising is better: 0.55 after 0.6 stops it


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
    assert "Epoch 1: accuracy improved from None to" in capsys.readouterr().out  # Keras 3's words
    assert (tmp_path / "sub" / "best.gpucnn").exists()


def test_checkpoint_refuses_a_bad_format_and_weights_under_a_model_name_before_training(tmp_path):
    with pytest.raises(ValueError, match="not a valid format string.*'{epoch:02d}'"):
        ModelCheckpoint(str(tmp_path / "{epoch:.2q}.gpucnn"))
    with pytest.raises(ValueError, match="not a valid format string"):
        ModelCheckpoint(str(tmp_path / "{epoch.x}.gpucnn"))
    for name in ("ckpt.keras", "ckpt-{epoch}.gpucnn"):  # a weights file there would pass for a model
        with pytest.raises(ValueError, match="save_weights_only=True.*whole saved model.*'model.weights.npz'"):
            ModelCheckpoint(str(tmp_path / name), save_weights_only=True)
    ModelCheckpoint(str(tmp_path / "{{literal}}-{epoch:03d}-{val_loss:.4f}.weights.npz"), save_weights_only=True)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_names_a_missing_log_key(tmp_path):
    model = tiny_model()
    with pytest.raises(KeyError, match="val_loss.*not in the logs"):
        model.fit(*tiny_data(), batch_size=8, epochs=1, verbose=0,
                  callbacks=[ModelCheckpoint(str(tmp_path / "{val_loss:.2f}.gpucnn"))])
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(UserWarning, match="only with 'val_loss' in the logs.*saving this epoch's model"):
        model.fit(*tiny_data(), batch_size=8, epochs=1, verbose=0,
                  callbacks=[ModelCheckpoint(str(tmp_path / "m.gpucnn"), save_best_only=True)])
    assert [p.name for p in tmp_path.iterdir()] == ["m.gpucnn"]  # Keras 3 saves, as without save_best_only
    with pytest.raises(NotImplementedError, match="end of each epoch only"):
        ModelCheckpoint(str(tmp_path / "m.gpucnn"), save_freq=100)
    assert ModelCheckpoint(str(tmp_path / "m.gpucnn"), save_freq="epoch").save_freq == "epoch"


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


# ===================================================================================== learning rate
class FakeOptimizer:
    def __init__(self, learning_rate):
        self.learning_rate = learning_rate


def drive_lr(cb, values, lr=1.0, key="val_loss"):
    """Feed ``values`` epoch by epoch to a learning-rate callback; the rate each epoch trained with."""
    model = FakeModel()
    model.optimizer = FakeOptimizer(lr)
    cb.set_model(model)
    cb.on_train_begin()
    rates = []
    for epoch, value in enumerate(values):
        cb.on_epoch_begin(epoch)
        logs = {key: value}
        cb.on_epoch_end(epoch, logs)
        rates.append(logs["learning_rate"])
    return rates, model.optimizer.learning_rate


def sgd_model(lr, seed=5):
    from gpucnn import utils
    utils.set_random_seed(seed)
    model = models.Sequential([layers.Conv2D(2, 3, activation="relu", input_shape=(6, 6, 1)),
                               layers.Flatten(), layers.Dense(3, activation="softmax")])
    model.compile(optimizers.SGD(learning_rate=lr), "sparse_categorical_crossentropy", ["accuracy"])
    return model


def test_learning_rate_scheduler_sets_the_rate_each_epoch_and_logs_it():
    model = sgd_model(0.1)
    seen = []
    history = model.fit(*tiny_data(), batch_size=4, epochs=3, verbose=0, callbacks=[
        callbacks.LearningRateScheduler(lambda epoch, lr: lr * 0.5),
        callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: seen.append(float(model.optimizer.learning_rate)))])
    # the float32 rates, as Keras's variable holds and logs them
    assert seen == history.history["learning_rate"] == [float(np.float32(r)) for r in (0.05, 0.025, 0.0125)]
    assert model.optimizer.learning_rate == 0.0125


def halve_down_to(epoch, lr):
    return lr * 0.5 if lr > 0.0125 else lr  # compares the rate it is given with a decimal


def test_a_schedule_that_compares_rates_sees_the_float32_rate_as_in_keras():
    """Keras keeps the rate as a float32 variable, so a schedule comparing it with 0.0125 sees 0.0125000001862...
    and halves once more: the same branch here (before, the exact decimal was kept and the halving stopped)."""
    history = sgd_model(0.1).fit(*tiny_data(), batch_size=4, epochs=5, verbose=0,
                                 callbacks=[callbacks.LearningRateScheduler(halve_down_to)])
    expected, lr = [], float(np.float32(0.1))
    for epoch in range(5):  # Keras's rule, step by step: the float32 rate in, the float32 of the result kept
        lr = float(np.float32(halve_down_to(epoch, lr)))
        expected.append(lr)
    assert history.history["learning_rate"] == expected and expected[3] < np.float32(0.0125)


def test_a_learning_rate_kept_at_train_begin_reads_the_rate_set_since():
    """Keras's optimizer.learning_rate is a variable: a callback that keeps it once and halves through it each epoch
    halves the rate each epoch (a copy taken at train begin would halve 0.1 again and again)."""
    class Halve(callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.rate = self.model.optimizer.learning_rate

        def on_epoch_end(self, epoch, logs=None):
            self.rate.assign(float(self.rate) * 0.5)

    model = sgd_model(0.1)
    model.fit(*tiny_data(), batch_size=4, epochs=3, verbose=0, callbacks=[Halve()])
    assert model.optimizer.learning_rate == 0.0125


def test_learning_rate_schedulers_rates_match_keras():
    keras = pytest.importorskip("keras", reason="Keras 3 is the oracle where it is installed (not a dependency)")
    x, y = tiny_data()
    rates = []
    import gpucnn
    for module in (gpucnn, keras):
        model = module.Sequential([module.layers.Input((6, 6, 1)), module.layers.Flatten(),
                                   module.layers.Dense(3, activation="softmax")])
        model.compile(module.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        history = model.fit(x, y, batch_size=4, epochs=5, verbose=0,
                            callbacks=[module.callbacks.LearningRateScheduler(halve_down_to)])
        rates.append(history.history["learning_rate"])
    assert rates[0] == rates[1]


def test_learning_rate_scheduler_rate_is_the_one_the_optimizer_uses():
    x, y = tiny_data()
    scheduled = sgd_model(0.1)
    scheduled.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False,
                  callbacks=[callbacks.LearningRateScheduler(lambda epoch: 0.03)])  # one argument: the epoch
    plain = sgd_model(0.03)
    plain.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    other = sgd_model(0.1)
    other.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for a, b, c in zip(scheduled.get_weights(), plain.get_weights(), other.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, c) for a, c in zip(scheduled.get_weights(), other.get_weights()))


def test_learning_rate_scheduler_verbose_and_bad_rates(capsys):
    rates, lr = drive_lr(callbacks.LearningRateScheduler(lambda epoch, lr: 0.1 / (epoch + 1), verbose=1),
                         [0.0, 0.0])
    assert rates == [float(np.float32(0.1)), float(np.float32(0.05))] and lr == np.float32(0.05)
    assert "Epoch 2: LearningRateScheduler setting learning rate to 0.05." in capsys.readouterr().out
    for schedule, error, match in [(lambda epoch, lr: 1, ValueError, "must return a float, got int 1"),
                                   (lambda epoch, lr: float("nan"), ValueError, "for epoch 0 is nan"),
                                   (lambda epoch, lr: -0.1, ValueError, "finite number >= 0"),
                                   (lambda epoch, lr: np.float32(np.inf), ValueError, "is inf")]:
        with pytest.raises(error, match=match):
            drive_lr(callbacks.LearningRateScheduler(schedule), [0.0])
    with pytest.raises(TypeError, match="takes a function"):
        callbacks.LearningRateScheduler(0.1)
    with pytest.raises(ValueError, match="needs a compiled model"):
        cb = callbacks.LearningRateScheduler(lambda epoch: 0.1)
        cb.set_model(FakeModel())
        cb.on_epoch_begin(0)


def test_reduce_lr_on_plateau_patience_cooldown_and_min_lr():
    # patience 2: two epochs without improvement, then the rate is cut (after the epoch's logs); min_delta
    # 1e-4 by default, so 0.84995 after 0.85 is no improvement
    values = [1.0, 0.9, 0.95, 0.91, 0.85, 0.84995, 0.86]
    rates, lr = drive_lr(callbacks.ReduceLROnPlateau(factor=0.5, patience=2), values)
    assert rates == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5] and lr == 0.25
    assert drive_lr(callbacks.ReduceLROnPlateau(factor=0.5, patience=2, min_delta=0.0), values)[1] == 0.5
    # cooldown: counted down from the epoch after a cut (Keras's rule), the wait does not grow meanwhile; with
    # patience 1 a cut every epoch, with cooldown 2 every second epoch
    rates, _ = drive_lr(callbacks.ReduceLROnPlateau(factor=0.5, patience=1), [1.0] * 6)
    assert rates == [1.0, 1.0, 0.5, 0.25, 0.125, 0.0625]
    rates, _ = drive_lr(callbacks.ReduceLROnPlateau(factor=0.5, patience=1, cooldown=2), [1.0] * 6)
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    # min_lr: never below it, and no cut once there
    rates, lr = drive_lr(callbacks.ReduceLROnPlateau(factor=0.1, patience=1, min_lr=0.05), [1.0] * 5)
    assert rates == [1.0, 1.0, 0.1, 0.05, 0.05] and lr == 0.05
    # accuracy should rise: mode auto picks "max"; min_delta
    rates, _ = drive_lr(callbacks.ReduceLROnPlateau("val_accuracy", factor=0.5, patience=1, min_delta=0.05),
                        [0.5, 0.52, 0.6, 0.7, 0.72], key="val_accuracy")
    assert rates == [1.0, 1.0, 0.5, 0.5, 0.5]


def test_reduce_lr_on_plateau_in_fit(capsys):
    model = sgd_model(0.2)
    script = Script(loss=[1.0, 1.0, 1.0, 0.5, 0.5])
    history = model.fit(*tiny_data(), batch_size=4, epochs=5, verbose=0, callbacks=[
        script, callbacks.ReduceLROnPlateau("loss", factor=0.5, patience=1, verbose=1)])
    assert history.history["learning_rate"] == [float(np.float32(r)) for r in (0.2, 0.2, 0.1, 0.05, 0.05)]
    assert model.optimizer.learning_rate == 0.025
    out = capsys.readouterr().out
    assert "Epoch 2: ReduceLROnPlateau reducing learning rate to 0.1." in out
    assert "Epoch 5: ReduceLROnPlateau reducing learning rate to 0.025." in out


def test_reduce_lr_on_plateau_refuses_bad_arguments_and_warns_without_its_monitor():
    with pytest.raises(ValueError, match=r"factor must be in \[0, 1\)"):
        callbacks.ReduceLROnPlateau(factor=1.0)
    with pytest.raises(ValueError, match="min_lr must be"):
        callbacks.ReduceLROnPlateau(min_lr=-1)
    missing = r"'val_loss', which is not in the logs; available: \['learning_rate', 'loss'\]"
    with pytest.warns(UserWarning, match=missing):
        rates, _ = drive_lr(callbacks.ReduceLROnPlateau(patience=0), [1.0, 2.0], key="loss")
    assert rates == [1.0, 1.0]


def test_reduce_lr_on_plateau_matches_keras():
    keras = pytest.importorskip("keras", reason="Keras 3 is the oracle where it is installed (not a dependency)")
    values = [1.0, 0.9, 0.95, 0.91, 0.85, 0.89999, 0.86, 0.87, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7]
    for kwargs in [dict(factor=0.5, patience=2), dict(factor=0.5, patience=1, cooldown=2),
                   dict(factor=0.1, patience=1, min_lr=0.05), dict(factor=0.3, patience=0, min_delta=0.02)]:
        (ours, our_lr), (theirs, their_lr) = (drive_lr(module.ReduceLROnPlateau(**kwargs), values)
                                              for module in (callbacks, keras.callbacks))
        assert ours == pytest.approx(theirs, rel=1e-12) and our_lr == pytest.approx(their_lr, rel=1e-12), kwargs


# ===================================================================================== CSVLogger
def read_csv(path, sep=","):
    import csv
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter=sep))


def test_csv_logger_writes_each_epochs_logs(tmp_path):
    path = tmp_path / "log.csv"
    model = tiny_model()
    history = model.fit(*tiny_data(), batch_size=4, epochs=2, verbose=0, validation_data=tiny_data(8),
                        callbacks=[callbacks.CSVLogger(path)])
    rows = read_csv(path)
    assert rows[0] == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]
    assert [int(r[0]) for r in rows[1:]] == [0, 1]
    for i, key in enumerate(rows[0][1:], start=1):
        assert [float(r[i]) for r in rows[1:]] == history.history[key]
    assert path.read_bytes().count(b"\r\n") == 3  # the csv module's excel dialect, as Keras writes


def test_csv_logger_append_separator_and_missing_validation(tmp_path):
    path = tmp_path / "log.tsv"
    model = tiny_model()
    for _ in range(2):
        model.fit(*tiny_data(), batch_size=4, epochs=2, verbose=0,
                  callbacks=[callbacks.CSVLogger(str(path), separator="\t", append=True)])
    rows = read_csv(path, "\t")
    assert rows[0] == ["epoch", "accuracy", "loss", "val_accuracy", "val_loss"]  # val_ columns anyway
    assert len(rows) == 5 and [r[0] for r in rows[1:]] == ["0", "1", "0", "1"]  # one header
    assert all(r[3:] == ["NA", "NA"] for r in rows[1:])
    model.fit(*tiny_data(), batch_size=4, epochs=1, verbose=0, callbacks=[callbacks.CSVLogger(path)])
    assert len(read_csv(path, "\t")) == 2  # append=False starts the file again


def test_csv_logger_appending_other_keys_adds_columns_instead_of_shifting_values(tmp_path):
    """A run that logs keys the file has no column for (here accuracy after a run without metrics): the columns are
    widened, the old rows get "NA" there, and every value stays under its own name (Keras writes the new row's
    values under the old header)."""
    path = tmp_path / "log.csv"
    plain = models.Sequential([layers.Input((6, 6, 1)), layers.Flatten(), layers.Dense(3, activation="softmax")])
    plain.compile("sgd", "sparse_categorical_crossentropy")
    plain.fit(*tiny_data(), batch_size=4, epochs=1, verbose=0, callbacks=[callbacks.CSVLogger(path, append=True)])
    with_metric = tiny_model()
    history = with_metric.fit(*tiny_data(), batch_size=4, epochs=2, verbose=0,
                              callbacks=[callbacks.CSVLogger(path, append=True)])
    rows = read_csv(path)
    assert rows[0] == ["epoch", "loss", "val_loss", "accuracy", "val_accuracy"]
    assert all(len(r) == 5 for r in rows) and len(rows) == 4
    assert rows[1][3:] == ["NA", "NA"]
    by_name = [dict(zip(rows[0], r)) for r in rows[2:]]
    assert [float(r["accuracy"]) for r in by_name] == history.history["accuracy"]
    assert [float(r["loss"]) for r in by_name] == history.history["loss"]


def test_csv_logger_matches_keras(tmp_path):
    keras = pytest.importorskip("keras", reason="Keras 3 is the oracle where it is installed (not a dependency)")
    epochs = [{"loss": 0.5, "accuracy": 0.25, "note": "x", "lr_list": [1, 2]}, {"loss": 0.25, "accuracy": 0.5}]
    texts = []
    for module, name in ((callbacks, "ours.csv"), (keras.callbacks, "keras.csv")):
        cb = module.CSVLogger(str(tmp_path / name), separator=";")
        cb.on_train_begin()
        for epoch, logs in enumerate(epochs):
            cb.on_epoch_end(epoch, dict(logs))
        cb.on_train_end()
        texts.append((tmp_path / name).read_bytes())
    assert texts[0] == texts[1]


# ===================================================================================== LambdaCallback
def test_lambda_callback_calls_the_functions_as_keras_does():
    calls = []
    cb = callbacks.LambdaCallback(
        on_train_begin=lambda logs: calls.append(("train_begin", logs)),
        on_epoch_begin=lambda epoch, logs: calls.append(("epoch_begin", epoch)),
        on_epoch_end=lambda epoch, logs: calls.append(("epoch_end", epoch, sorted(logs))),
        on_batch_end=lambda batch, logs: calls.append(("batch_end", batch)),  # Keras 2's name
        on_train_end=lambda logs: calls.append(("train_end", sorted(logs))),
        on_test_end=lambda logs: calls.append(("test_end",)))
    tiny_model().fit(*tiny_data(8), batch_size=4, epochs=2, verbose=0, callbacks=[cb],
                     validation_data=tiny_data(4))
    epoch_logs = ["accuracy", "loss", "val_accuracy", "val_loss"]
    epoch = lambda e: [("epoch_begin", e), ("batch_end", 0), ("batch_end", 1), ("test_end",),  # noqa: E731
                       ("epoch_end", e, epoch_logs)]
    assert calls == [("train_begin", {})] + epoch(0) + epoch(1) + [("train_end", epoch_logs)]


def test_lambda_callback_passes_a_batch_hooks_logs_by_keyword_as_keras():
    """Keras's callback list passes a batch hook's logs as ``logs=`` (a function ``lambda batch, **kw`` works there),
    an epoch hook's by position."""
    seen = []
    cb = callbacks.LambdaCallback(on_train_batch_end=lambda batch, **kw: seen.append(sorted(kw)),
                                  on_batch_begin=lambda batch, **kw: seen.append(("begin", sorted(kw))),
                                  on_epoch_end=lambda epoch, *args: seen.append(len(args)))
    tiny_model().fit(*tiny_data(4), batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert seen == [("begin", ["logs"]), ["logs"], 1]


def test_lambda_callback_refuses_unknown_hooks_and_non_functions():
    with pytest.raises(TypeError, match="unknown hook 'on_epoch_ends'"):
        callbacks.LambdaCallback(on_epoch_ends=print)
    with pytest.raises(TypeError, match="on_epoch_end must be a function"):
        callbacks.LambdaCallback(on_epoch_end=3)
    cb = callbacks.LambdaCallback()
    cb.on_epoch_end(0, {})  # no function: the base hook, which does nothing


def test_csv_logger_appends_under_a_files_own_column_order_and_refuses_rows_it_cannot_read(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("accuracy,epoch,loss,val_accuracy,val_loss\n0.5,0,1.0,NA,NA\n")  # another tool's order
    history = tiny_model().fit(*tiny_data(), batch_size=4, epochs=1, verbose=0,
                               callbacks=[callbacks.CSVLogger(path, append=True)])
    rows = read_csv(path)
    assert len(rows) == 3 and dict(zip(rows[0], rows[2]))["epoch"] == "0"
    assert float(dict(zip(rows[0], rows[2]))["accuracy"]) == history.history["accuracy"][0]
    # a row longer than its header (an earlier version appended other keys so): refused before training
    path.write_text("epoch,loss,val_loss\n0,1.5,NA\n0,0.3,1.4,NA,NA\n")
    model = tiny_model()
    before = model.get_weights()
    with pytest.raises(ValueError, match="line 3 of .* holds more values than its header has columns"):
        model.fit(*tiny_data(), batch_size=4, epochs=1, verbose=0, callbacks=[callbacks.CSVLogger(path, append=True)])
    np.testing.assert_array_equal(model.get_weights()[0], before[0])
    assert path.read_text() == "epoch,loss,val_loss\n0,1.5,NA\n0,0.3,1.4,NA,NA\n"


def test_learning_rate_scheduler_takes_keras_docs_schedule_written_with_keras_ops():
    """Keras's docs write the schedule as ``lr * ops.exp(-0.1)`` after ten epochs: keras.ops gives a 0-d float32 array,
    taken as the rate."""
    import gpucnn as keras

    def scheduler(epoch, lr):
        return lr if epoch < 1 else lr * keras.ops.exp(-0.1)

    history = sgd_model(0.1).fit(*tiny_data(), batch_size=4, epochs=3, verbose=0,
                                 callbacks=[callbacks.LearningRateScheduler(scheduler)])
    first = float(np.float32(0.1))
    second = float(np.float32(first * np.float32(np.exp(np.float32(-0.1)))))
    assert history.history["learning_rate"][:2] == [first, second]
    with pytest.raises(ValueError, match="must return a float"):
        sgd_model(0.1).fit(*tiny_data(), batch_size=4, epochs=1, verbose=0, callbacks=[
            callbacks.LearningRateScheduler(lambda epoch: keras.ops.convert_to_tensor([0.1, 0.2]))])
