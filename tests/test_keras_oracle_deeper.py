"""Keras 3 as the oracle for the deeper convnets: a residual block with BatchNormalization and a SeparableConv2D
(Keras's weights moved in by set_weights) gives Keras's predictions, and Keras's loss and weights — moving
statistics included — after two training steps, with and without frozen layers (which stay bit-identical); the
learning-rate schedules give Keras's rates in training; the book's Xception-like model has Keras's summary.

Runs only where Keras is installed (a scratch environment: ``pip install keras torch``, ``KERAS_BACKEND=torch``);
Keras is never a dependency of gpucnn."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras_ref = pytest.importorskip("keras")

import gpucnn  # noqa: E402
from book_models import residual_block, xception_like  # noqa: E402
from helpers import summary_lines  # noqa: E402

pytestmark = pytest.mark.usefixtures("numpy_engine")


def _data(n=12, shape=(8, 8, 3), classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n,) + shape) * 2 + 0.5).astype(np.float32), rng.integers(0, classes, n)


def _pair(frozen=(), seed=0):
    """The residual block in Keras and in gpucnn, with Keras's initial weights and moving statistics made
    non-trivial (so inference mode differs from training mode)."""
    keras_ref.utils.set_random_seed(seed)
    ref = residual_block(keras_ref, frozen=frozen)
    ours = residual_block(gpucnn, frozen=frozen)
    rng = np.random.default_rng(seed + 1)
    weights = []
    for w in ref.weights:
        value = np.asarray(w.numpy())
        if w.path.endswith(("moving_mean", "beta")):
            value = rng.standard_normal(value.shape).astype(np.float32) * 0.5
        elif w.path.endswith(("moving_variance", "gamma")):
            value = rng.uniform(0.5, 2, value.shape).astype(np.float32)
        weights.append(value)
    ref.set_weights(weights)
    ours.set_weights(weights)
    return ref, ours


def _compile(ref, ours, make_optimizer):
    ref.compile(optimizer=make_optimizer(keras_ref), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ours.compile(optimizer=make_optimizer(gpucnn), loss="sparse_categorical_crossentropy", metrics=["accuracy"])


def test_the_residual_block_predicts_as_keras_in_inference():
    ref, ours = _pair()
    x, _ = _data()
    np.testing.assert_allclose(ours.predict(x, verbose=0), np.asarray(ref.predict(x, verbose=0)), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("frozen", [(), ("bn_1",), ("conv", "bn_2")], ids=["all", "bn_1", "conv+bn_2"])
@pytest.mark.parametrize("optimizer, batch", [("rmsprop", 6), ("adam", 6), ("rmsprop", 32)])
def test_two_training_steps_give_keras_loss_and_weights(frozen, optimizer, batch):
    """(Batches of 32: where the NumPy engine splits a step over two processes, whose halves exchange their
    sums to take the whole batch's statistics.)"""
    ref, ours = _pair(frozen)
    x, y = _data(2 * batch)
    make = {"rmsprop": lambda lib: lib.optimizers.RMSprop(learning_rate=0.01),
            "adam": lambda lib: lib.optimizers.Adam(learning_rate=0.01)}[optimizer]
    _compile(ref, ours, make)
    before = {layer.name: layer.get_weights() for layer in ours.layers}
    h_ref = ref.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0).history
    h_ours = ours.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0).history
    np.testing.assert_allclose(h_ours["loss"], h_ref["loss"], rtol=1e-5)
    # Each step moves a weight by up to the rate, 1e-2 (Adam's first steps move every weight by about that much,
    # whatever its gradient's size, so a gradient near zero is rounding-sensitive): 5e-5 is half a percent of it
    for w_ref, got in zip(ref.weights, ours.get_weights()):
        np.testing.assert_allclose(got, np.asarray(w_ref.numpy()), rtol=1e-4, atol=5e-5, err_msg=w_ref.path)
    for name in frozen:  # frozen layers: not a bit changed, moving statistics included
        for got, want in zip(ours.get_layer(name).get_weights(), before[name]):
            np.testing.assert_array_equal(got, want)
    for name in {"bn_1", "bn_2"} - set(frozen):  # the others' moving statistics moved
        assert not np.array_equal(ours.get_layer(name).get_weights()[2], before[name][2])
    np.testing.assert_allclose(ours.predict(x, verbose=0), np.asarray(ref.predict(x, verbose=0)), rtol=1e-4,
                               atol=1e-5)


def test_batch_normalization_on_a_batch_of_one_as_keras():
    """One vector in training: Keras gives beta (a variance of 0), no NaN, and moves the statistics."""
    def head(lib):
        inputs = lib.Input(shape=(5,))
        return lib.Model(inputs, lib.layers.BatchNormalization()(inputs))
    ref, ours = head(keras_ref), head(gpucnn)
    rng = np.random.default_rng(3)
    weights = [rng.uniform(0.5, 2, 5), rng.standard_normal(5), rng.standard_normal(5), rng.uniform(0.5, 2, 5)]
    ref.set_weights([w.astype(np.float32) for w in weights])
    ours.set_weights(weights)
    x = rng.standard_normal((1, 5)).astype(np.float32)
    want = np.asarray(ref(x, training=True).detach().cpu().numpy())
    got = gpucnn.backend.to_numpy(ours(x, training=True))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    for w_ref, w in zip(ref.weights, ours.get_weights()):
        np.testing.assert_allclose(w, np.asarray(w_ref.numpy()), rtol=1e-6, atol=1e-7)


SCHEDULES = [
    ("ExponentialDecay", dict(initial_learning_rate=0.05, decay_steps=2, decay_rate=0.5)),
    ("ExponentialDecay", dict(initial_learning_rate=0.05, decay_steps=2, decay_rate=0.5, staircase=True)),
    ("PiecewiseConstantDecay", dict(boundaries=[1, 3], values=[0.05, 0.02, 0.005])),
    ("CosineDecay", dict(initial_learning_rate=0.05, decay_steps=4, alpha=0.1)),
    ("CosineDecay", dict(initial_learning_rate=0.0, decay_steps=3, warmup_target=0.05, warmup_steps=2)),
]


@pytest.mark.parametrize("name, kwargs", SCHEDULES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SCHEDULES)])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam"])
def test_schedules_give_keras_rates_in_training(name, kwargs, optimizer):
    """Six steps under the schedule: Keras's weights after them (so each step used Keras's rate), and the
    optimizer's learning_rate as Keras reads it."""
    ref, ours = _pair()
    x, y = _data(18)
    opts = {}

    def make(lib):
        opts[lib] = getattr(lib.optimizers, optimizer)(learning_rate=getattr(lib.optimizers.schedules, name)(**kwargs))
        return opts[lib]
    _compile(ref, ours, make)
    for m in (ref, ours):
        m.fit(x, y, batch_size=6, epochs=2, shuffle=False, verbose=0)
    for w_ref, got in zip(ref.weights, ours.get_weights()):
        np.testing.assert_allclose(got, np.asarray(w_ref.numpy()), rtol=2e-4, atol=2e-5, err_msg=w_ref.path)
    assert int(opts[keras_ref].iterations.numpy()) == opts[gpucnn].iterations == 6
    want = float(np.asarray(opts[keras_ref].learning_rate.numpy()))
    assert opts[gpucnn].learning_rate == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_the_xception_like_model_has_keras_summary(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    keras_ref.utils.clear_session()
    gpucnn.utils.clear_session()
    ref, ours = xception_like(keras_ref), xception_like(gpucnn)
    assert summary_lines(ours) == summary_lines(ref)
    assert ours.count_params() == ref.count_params()
