"""Nothing silently wrong after an interruption: Ctrl-C at any point of ``fit`` leaves a model whose weights and
optimizer state are those before or after a whole step, and whose next ``fit`` gives, bit for bit, what a fresh
process gives from the same saved state; an optimizer step is never half-applied."""
import functools
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from gpucnn import backend, callbacks, layers, models, optimizers, saving, utils
from gpucnn.engines import numpy_ops
from gpucnn.models import parallel

pytestmark = pytest.mark.usefixtures("numpy_engine")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_model():
    return models.Sequential([
        layers.Conv2D(6, 3, activation="relu", input_shape=(12, 12, 1)),
        layers.MaxPooling2D(2),
        layers.Conv2D(8, 3, activation="relu"),
        layers.Flatten(),
        layers.Dense(16, activation="relu"),
        layers.Dense(4, activation="softmax")])


def data(n=100):
    r = np.random.default_rng(n)
    return r.random((n, 12, 12, 1), dtype=np.float32), utils.to_categorical(r.integers(0, 4, n), 4)


FIT = dict(batch_size=32, verbose=0)  # 100 samples: three split steps and a one-process step of 4


def state(model):
    """Everything a next fit depends on: weights, optimizer state and step count, the random state."""
    opt = model.optimizer
    return ([w.copy() for w in model.get_weights()],
            {k: backend.to_numpy(v).copy() for k, v in (opt.state or {}).items()},
            int(opt.iterations), utils.rng().bit_generator.state)


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    assert a[1].keys() == b[1].keys() and a[2] == b[2]
    for k in a[1]:
        np.testing.assert_array_equal(a[1][k], b[1][k])


class StopAfter(callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def on_train_batch_end(self, batch, logs=None):
        self.steps -= 1
        if self.steps == 0:
            self.model.stop_training = True


class CtrlC:
    """Counts the points where a Ctrl-C can land, by kind: ``op`` (an engine op of the forward or backward
    pass), ``update`` (the optimizer's op) and ``wait`` (this process waiting for the worker's reply);
    ``at = (kind, k)`` makes the k-th point of that kind from now on be preceded by a real SIGINT,
    delivered as Ctrl-C is."""

    def __init__(self):
        self.at, self.counts = None, {"op": 0, "update": 0, "wait": 0}

    def reset(self, at=None):
        self.at, self.counts = at, dict.fromkeys(self.counts, 0)

    def wrap(self, f, kind):
        @functools.wraps(f)
        def interruptible(*args, **kwargs):
            self.counts[kind] += 1
            if self.at == (kind, self.counts[kind]):
                signal.raise_signal(signal.SIGINT)
            return f(*args, **kwargs)
        return interruptible


@pytest.fixture
def ctrl_c(monkeypatch):
    ctrl = CtrlC()
    for name in dir(numpy_ops):
        f = getattr(numpy_ops, name)
        if callable(f) and getattr(f, "__module__", None) == numpy_ops.__name__ and not name.startswith("_"):
            monkeypatch.setattr(numpy_ops, name, ctrl.wrap(f, "update" if name.endswith("_update") else "op"))
    monkeypatch.setattr(parallel._Worker, "result", ctrl.wrap(parallel._Worker.result, "wait"))
    return ctrl


def test_ctrl_c_anywhere_in_fit_leaves_a_consistent_model_that_trains_on_as_a_fresh_process(ctrl_c, tmp_path):
    """Interrupt ``fit`` at 30 seeded random points (engine ops, the optimizer step, the wait for the worker
    process): each time the model holds a whole number of steps (equal to an uninterrupted run stopped after
    as many steps), and the next fit equals, bit for bit, that of a fresh process loading the state saved
    right after the interruption: the same loss, accuracy and weights."""
    x, y = data()
    utils.set_random_seed(3)
    model = small_model()
    model.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=1, **FIT)
    ctrl_c.reset()
    model.fit(x, y, epochs=2, **FIT)
    per_fit = {kind: n for kind, n in ctrl_c.counts.items() if n}
    assert per_fit.keys() >= {"op", "update"}
    choose = np.random.default_rng(2024)
    points = [(kind, int(choose.integers(1, per_fit[kind] + 1)))
              for kind in choose.choice(sorted(per_fit), 30)]
    expected = []
    for k, point in enumerate(points):
        before = state(model)
        ctrl_c.reset(point)
        with pytest.raises(KeyboardInterrupt):
            model.fit(x, y, epochs=2, **FIT)
        ctrl_c.reset()
        after = state(model)
        steps = after[2] - before[2]
        # the same steps without an interruption, from the same state
        reference = small_model()
        reference.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
        reference.build()
        reference.set_weights(before[0])
        if steps:
            reference.optimizer.iterations = before[2]
            reference.optimizer.build(reference._params.shape[0])
            for slot, value in before[1].items():
                reference.optimizer.state[slot][...] = value
            utils.rng().bit_generator.state = before[3]
            reference.fit(x, y, epochs=2, callbacks=[StopAfter(steps)], **FIT)
            assert_same(state(reference), after)
        else:
            assert_same(after, before)
        utils.rng().bit_generator.state = after[3]
        saving.save_model(model, tmp_path / f"{k}.gpucnn")
        history = model.fit(x, y, epochs=1, **FIT).history
        expected.append([np.array([history["loss"][0], history["accuracy"][0]])] + model.get_weights())
    assert parallel._state["failed"] is None  # no step fell back to one process

    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {ROOT!r})
        sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
        from gpucnn import backend, models
        from test_reliability import data, FIT
        backend.set_engine("cpu")
        x, y = data()
        for k in range({len(points)}):
            model = models.load_model({str(tmp_path)!r} + f"/{{k}}.gpucnn")
            history = model.fit(x, y, epochs=1, **FIT).history
            logs = np.array([history["loss"][0], history["accuracy"][0]])
            np.savez({str(tmp_path)!r} + f"/{{k}}.npz", logs, *model.get_weights())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for k, weights in enumerate(expected):
        with np.load(tmp_path / f"{k}.npz") as fresh:
            for i, w in enumerate(weights):
                np.testing.assert_array_equal(fresh[f"arr_{i}"], w, err_msg=f"interruption {k}")


@pytest.mark.parametrize("optimizer", [optimizers.RMSprop(0.01, momentum=0.5, centered=True),
                                       optimizers.Adam(), optimizers.SGD(0.1, momentum=0.9)])
def test_ctrl_c_inside_an_optimizer_step_takes_effect_after_it(optimizer, monkeypatch):
    """A SIGINT that arrives half-way through the update: KeyboardInterrupt comes out of ``apply`` with the
    step complete (weights, state, iterations) — the same as an uninterrupted step."""
    n = 10
    r = np.random.default_rng(0)
    params, grads = r.random(n, dtype=np.float32), r.random(n, dtype=np.float32)
    plain = type(optimizer)(**{k: v for k, v in optimizer.get_config().items() if k != "name"})
    want = params.copy()
    plain.apply(want, grads)
    name = {"rmsprop": "rmsprop_update", "adam": "adam_update", "sgd": "sgd_update"}[optimizer.name]
    real = getattr(numpy_ops, name)

    def half_then_ctrl_c(w, g, *rest):
        before = w.copy()
        w[:n // 2] = 0.0  # a half-done update ...
        signal.raise_signal(signal.SIGINT)  # ... interrupted
        w[...] = before
        return real(w, g, *rest)

    monkeypatch.setattr(numpy_ops, name, half_then_ctrl_c)
    got = params.copy()
    with pytest.raises(KeyboardInterrupt):
        optimizer.apply(got, grads)
    assert optimizer.iterations == plain.iterations == 1
    np.testing.assert_array_equal(got, want)
    for slot in plain.state:
        np.testing.assert_array_equal(optimizer.state[slot], plain.state[slot])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ===================================================================================== resuming, user classes
def test_a_layers_random_state_is_validated_like_the_global_one():
    layer = layers.Dropout(0.5, seed=3)
    state = layer.random_state()
    layer.next_seed()
    layer.set_random_state(state)
    assert layer.random_state() == state
    for bad in ({**state, "bit_generator": "MT19937"}, {**state, "has_uint32": 1.5},
                {**state, "state": {"state": -1, "inc": 1}}, {**state, "state": {"state": 2**200, "inc": 1}},
                None, "PCG64"):
        with pytest.raises(ValueError):
            layer.set_random_state(bad)
        assert layer.random_state() == state  # untouched
    with pytest.raises(ValueError, match="has no seed"):
        layers.Dropout(0.5).set_random_state(state)
    assert layers.Dropout(0.5).random_state() is None


class Dense(layers.Dense):
    """A user's Dense named like the built-in, with maths of its own: outputs doubled."""

    def forward(self, x, training, ctx):
        return 2 * super().forward(x, training, ctx)


class DoubledDense(Dense):
    pass


def test_a_user_class_named_like_a_built_in_is_refused_at_save_time(tmp_path):
    model = models.Sequential([layers.Flatten(input_shape=(2, 2, 1)), Dense(3)])
    model.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refusal comes alone, not after a warning about the same class
        with pytest.raises(ValueError, match=r"test_reliability.Dense has the name of gpucnn's built-in Dense.*"
                                             r"custom_objects=.*register_layer_class"):
            model.save(tmp_path / "m.gpucnn")
    assert not os.listdir(tmp_path)


def test_custom_objects_load_a_users_layer_class(tmp_path):
    x = np.random.default_rng(0).random((4, 2, 2, 1), dtype=np.float32)
    model = models.Sequential([layers.Flatten(input_shape=(2, 2, 1)), DoubledDense(3)])
    model.build()
    with pytest.warns(UserWarning, match=r"class test_reliability.DoubledDense, which is not one of gpucnn's own.*"
                                         r"custom_objects=\{'DoubledDense': DoubledDense\}"):
        model.save(tmp_path / "m.gpucnn")
    with pytest.raises(saving.InvalidModelFile, match="unknown layer class 'DoubledDense'.*custom_objects"):
        models.load_model(tmp_path / "m.gpucnn")
    loaded = models.load_model(tmp_path / "m.gpucnn", custom_objects={"DoubledDense": DoubledDense})
    assert type(loaded.layers[1]) is DoubledDense
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for bad in ({"DoubledDense": object}, {"DoubledDense": print}, [DoubledDense]):
        with pytest.raises(TypeError, match="custom"):
            models.load_model(tmp_path / "m.gpucnn", custom_objects=bad)
    with pytest.raises(ValueError, match="name of gpucnn's built-in Dense"):
        saving.register_layer_class(Dense)
    try:
        assert saving.register_layer_class(DoubledDense) is DoubledDense
        assert type(models.load_model(tmp_path / "m.gpucnn").layers[1]) is DoubledDense
    finally:
        saving._registered.clear()
