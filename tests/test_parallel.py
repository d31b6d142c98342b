"""The NumPy engine's training step split over two processes (gpucnn/models/parallel.py): the same loss, accuracy and
gradients as the one-process step (up to float32 summation order), the same bits from run to run, OpenBLAS's
thread count restored, the one-process step wherever the split does not apply, and training that goes on in
one process, with a warning, when the worker process fails."""
import glob
import os
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest

from gpucnn import layers, models, utils
from gpucnn.models import parallel

pytestmark = pytest.mark.usefixtures("numpy_engine", "worker_state")


@pytest.fixture
def worker_state():
    """Each test starts with no recorded worker failure (and a worker a test broke is not reused)."""
    parallel._state["failed"] = None
    yield
    worker = parallel._state["worker"]
    if parallel._state["failed"] is not None or (worker is not None and worker.process.poll() is not None):
        parallel._state["failed"] = None
        parallel._stop()


def needs_split():
    reason = parallel.split_reason(small_model(), 64)
    if reason is not None:
        pytest.skip(f"no split step here: {reason}")


def small_model(dropout=0.0):
    utils.set_random_seed(11)
    m = models.Sequential([
        layers.Conv2D(6, 3, activation="relu", input_shape=(12, 12, 1)),
        layers.MaxPooling2D(2),
        layers.Conv2D(8, 3, activation="relu"),
        layers.Flatten(),
        layers.Dropout(dropout),
        layers.Dense(16, activation="relu"),
        layers.Dense(4, activation="softmax")])
    return m


def data(n, sparse):
    rng = np.random.default_rng(n)
    x = rng.random((n, 12, 12, 1), dtype=np.float32)
    labels = rng.integers(0, 4, n)
    return x, (labels.astype(np.int64) if sparse else utils.to_categorical(labels, 4))


def grads(m):
    """Every weight gradient of the model, flat (the buffer's alignment padding left out)."""
    return np.concatenate([g.ravel() for layer in m._all_layers() for g in layer.grads])


def one_thread_step(m, xb, yb, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setattr(parallel, "split_reason", lambda model, batch: "off")
        m._grads[...] = np.nan  # every gradient must be written
        loss, correct = m._forward_backward(xb, yb)
    return float(loss), int(correct), grads(m)


@pytest.mark.parametrize("n", [32, 41])  # equal halves and halves of 20 and 21
@pytest.mark.parametrize("loss", ["categorical_crossentropy", "sparse_categorical_crossentropy"])
def test_the_split_step_gives_the_one_thread_step(n, loss, monkeypatch):
    m = small_model()
    m.compile("rmsprop", loss, ["accuracy"])
    m.build()
    x, y = data(n, loss.startswith("sparse"))
    loss_1, correct_1, grads_1 = one_thread_step(m, x, y, monkeypatch)
    m._grads[...] = np.nan
    loss_2, correct_2 = parallel.split_step(m, x, y)
    grads_2 = grads(m)
    assert np.isfinite(grads_1).all() and np.abs(grads_1).max() > 0
    np.testing.assert_allclose(float(loss_2), loss_1, rtol=1e-5)
    assert int(correct_2) == correct_1
    np.testing.assert_allclose(grads_2, grads_1, rtol=1e-4, atol=1e-6 * np.abs(grads_1).max())
    # again: the same bits
    m._grads[...] = np.nan
    loss_3, _ = parallel.split_step(m, x, y)
    assert float(loss_3) == float(loss_2)
    np.testing.assert_array_equal(grads(m), grads_2)


@pytest.mark.parametrize("n", [32, 41])
def test_the_split_step_draws_what_the_one_process_step_draws(n, monkeypatch):
    """Dropout's masks and the augmentation layers' values are drawn for the whole batch in this process;
    each half reads its part (the worker: its images' values and its rows of the masks), so the split step
    is the one-process step, draws included."""
    needs_split()

    def build():
        utils.set_random_seed(11)
        m = models.Sequential([
            layers.Input(shape=(12, 12, 1)),
            layers.RandomFlip(seed=1), layers.RandomRotation(0.2, seed=2),
            layers.RandomContrast(0.5, seed=3, value_range=(0, 1)),
            layers.Conv2D(6, 3, activation="relu"), layers.MaxPooling2D(2), layers.Flatten(),
            layers.Dropout(0.5, seed=4), layers.Dense(4, activation="softmax")])
        m.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
        return m

    x, y = data(n, False)
    one, two = build(), build()
    assert parallel.split_reason(two, n) is None
    loss_1, correct_1, grads_1 = one_thread_step(one, x, y, monkeypatch)
    two._grads[...] = np.nan
    loss_2, correct_2 = parallel.split_step(two, x, y)
    np.testing.assert_allclose(float(loss_2), loss_1, rtol=1e-5)
    assert int(correct_2) == correct_1
    np.testing.assert_allclose(grads(two), grads_1, rtol=1e-4, atol=1e-6 * np.abs(grads_1).max())
    _, _, grads_next = one_thread_step(one, x, y, monkeypatch)  # the next step's draws: other gradients
    assert np.abs(grads_next - grads_1).max() > 1e-3 * np.abs(grads_1).max()


@pytest.mark.parametrize("kind", ["logits", "binary", "functional"])
def test_the_worker_trains_the_same_loss_and_graph(kind, monkeypatch):
    """The worker rebuilds the model's graph (a functional one too) and its loss as configured (from_logits, a
    binary cross-entropy): its half-step is the one-process step's."""
    needs_split()
    from gpucnn import losses
    utils.set_random_seed(3)
    if kind == "functional":
        inputs = layers.Input((12, 12, 1))
        a = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
        x = layers.Concatenate()([layers.Add()([a, layers.Conv2D(4, 1)(a)]), inputs])
        m = models.Model(inputs, layers.Dense(4, activation="softmax")(layers.Flatten()(x)))
        loss, (x_in, y_in) = "sparse_categorical_crossentropy", data(40, True)
    else:
        m = models.Sequential([layers.Conv2D(4, 3, input_shape=(12, 12, 1)), layers.Flatten(),
                               layers.Dense(4 if kind == "logits" else 1,
                                            activation=None if kind == "logits" else "sigmoid")])
        x_in, y_in = data(40, True)
        loss = losses.SparseCategoricalCrossentropy(from_logits=True) if kind == "logits" else "binary_crossentropy"
        y_in = y_in if kind == "logits" else (y_in % 2).astype(np.float32)[:, None]
    m.compile("rmsprop", loss, ["accuracy"])
    m._pack_weights()
    loss_1, correct_1, grads_1 = one_thread_step(m, x_in, y_in, monkeypatch)
    m._grads[...] = np.nan
    loss_2, correct_2 = parallel.split_step(m, x_in, y_in)
    assert parallel._state["failed"] is None
    np.testing.assert_allclose(float(loss_2), loss_1, rtol=1e-5)
    assert int(correct_2) == correct_1
    np.testing.assert_allclose(grads(m), grads_1, rtol=1e-4, atol=1e-6 * np.abs(grads_1).max())


def test_fit_on_two_processes_is_repeatable_and_close_to_one_process(monkeypatch):
    needs_split()
    x, y = data(200, False)

    def fit(threads):
        monkeypatch.setenv("GPUCNN_CPU_THREADS", threads)
        m = small_model()
        m.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
        history = m.fit(x, y, batch_size=64, epochs=2, verbose=0)
        return history.history, m.get_weights()

    h2, w2 = fit("2")
    h2b, w2b = fit("2")
    h1, w1 = fit("1")
    for a, b in zip(w2, w2b):
        np.testing.assert_array_equal(a, b)
    assert h2 == h2b
    np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-4)
    for a, b in zip(w2, w1):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_when_the_step_is_not_split(monkeypatch):
    m = small_model()
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    monkeypatch.setattr(parallel, "_openblas_threads", lambda: (lambda: 2, lambda n: None))
    monkeypatch.delenv("GPUCNN_CPU_THREADS", raising=False)
    assert parallel.split_reason(m, 64) is None
    assert parallel.split_reason(small_model(dropout=0.0), 32) is None
    assert f"batch under {parallel.MIN_BATCH}" in parallel.split_reason(m, parallel.MIN_BATCH - 1)
    assert parallel.split_reason(small_model(dropout=0.5), 64) is None  # its masks are drawn for the whole batch
    monkeypatch.setenv("GPUCNN_CPU_THREADS", "1")
    assert parallel.split_reason(m, 64) == "GPUCNN_CPU_THREADS=1"
    monkeypatch.delenv("GPUCNN_CPU_THREADS")
    monkeypatch.setattr(parallel, "usable_cores", lambda: 1)
    assert parallel.split_reason(m, 64) == "one CPU core"
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    monkeypatch.setattr(parallel, "_openblas_threads", lambda: None)
    assert "OpenBLAS" in parallel.split_reason(m, 64)
    monkeypatch.setattr(parallel, "_openblas_threads", lambda: (lambda: 2, lambda n: None))
    monkeypatch.setitem(parallel._state, "failed", "EOFError: ")
    assert "failed earlier (EOFError" in parallel.split_reason(m, 64)
    monkeypatch.setitem(parallel._state, "failed", None)
    monkeypatch.setattr(os, "name", "nt")
    assert "POSIX" in parallel.split_reason(m, 64)


def frozen_model(bn_trainable=False):
    """A model whose first convolution and BatchNormalization are frozen (their weights, and the moving
    statistics, are not in the trained buffer), with fresh non-default values in them."""
    utils.set_random_seed(12)
    m = models.Sequential([layers.Conv2D(6, 3, input_shape=(12, 12, 1)), layers.BatchNormalization(),
                           layers.Activation("relu"), layers.Conv2D(8, 3, activation="relu"), layers.Flatten(),
                           layers.Dense(4, activation="softmax")])
    rng = np.random.default_rng(5)
    m.layers[1].set_weights([rng.uniform(0.5, 2, 6), rng.standard_normal(6), rng.standard_normal(6),
                             rng.uniform(0.5, 2, 6)])
    m.layers[0].trainable = False
    m.layers[1].trainable = bn_trainable
    m.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
    return m


def test_the_split_step_of_a_model_with_frozen_layers_gives_the_one_thread_step(monkeypatch):
    """The worker rebuilds the model from its config: the weights the optimizer leaves alone (a frozen layer's,
    the moving statistics) reach it through the file, this step's values."""
    m = frozen_model()
    x, y = data(40, True)
    loss_1, correct_1, grads_1 = one_thread_step(m, x, y, monkeypatch)
    m._grads[...] = np.nan
    loss_2, correct_2 = parallel.split_step(m, x, y)
    np.testing.assert_allclose(float(loss_2), loss_1, rtol=1e-5)
    assert int(correct_2) == correct_1
    assert np.isfinite(grads_1).all() and np.abs(grads_1).max() > 0
    np.testing.assert_allclose(grads(m), grads_1, rtol=1e-4, atol=1e-6 * np.abs(grads_1).max())
    m.layers[0].set_weights([w * 2 for w in m.layers[0].get_weights()])  # a frozen layer changed by the user
    loss_1, _, grads_1 = one_thread_step(m, x, y, monkeypatch)
    loss_2, _ = parallel.split_step(m, x, y)
    np.testing.assert_allclose(float(loss_2), loss_1, rtol=1e-5)


def bn_model():
    """Conv2D → BatchNormalization (training: the batch's statistics) → ReLU twice, a residual Add, a Dense head."""
    utils.set_random_seed(13)
    inputs = layers.Input(shape=(12, 12, 1))
    x = layers.Activation("relu")(layers.BatchNormalization()(layers.Conv2D(6, 3, use_bias=False)(inputs)))
    y = layers.BatchNormalization()(layers.Conv2D(6, 3, padding="same", use_bias=False)(x))
    x = layers.Activation("relu")(layers.Add()([x, y]))
    outputs = layers.Dense(4, activation="softmax")(layers.BatchNormalization()(layers.Flatten()(x)))
    m = models.Model(inputs, outputs)
    m.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
    return m


def moving_statistics(m):
    return [w.copy() for layer in m._all_layers() if isinstance(layer, layers.BatchNormalization)
            for w in layer.get_weights()[-2:]]


@pytest.mark.parametrize("n", [32, 41])
def test_the_split_step_of_a_training_batch_normalization_gives_the_one_process_step(n, monkeypatch):
    """The halves exchange their per-channel sums at each BatchNormalization (forward and backward): the loss,
    the gradients and the moving statistics are the one-process step's (up to float32 rounding), the same
    bits from run to run."""
    needs_split()
    x, y = data(n, True)
    one, two = bn_model(), bn_model()
    assert parallel.split_reason(two, n) is None
    loss_1, correct_1, grads_1 = one_thread_step(one, x, y, monkeypatch)
    two._grads[...] = np.nan
    before = moving_statistics(two)
    loss_2, correct_2 = parallel.split_step(two, x, y)
    np.testing.assert_allclose(float(loss_2), loss_1, rtol=1e-5)
    assert int(correct_2) == correct_1
    assert np.isfinite(grads_1).all() and np.abs(grads_1).max() > 0
    np.testing.assert_allclose(grads(two), grads_1, rtol=1e-4, atol=1e-5 * np.abs(grads_1).max())
    for got, want, old in zip(moving_statistics(two), moving_statistics(one), before):
        assert np.abs(want - old).max() > 1e-4  # the step moved them
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the same bits again, from the same moving statistics
    again = bn_model()
    again._grads[...] = np.nan
    loss_3, _ = parallel.split_step(again, x, y)
    assert float(loss_3) == float(loss_2)
    np.testing.assert_array_equal(grads(again), grads(two))
    for a, b in zip(moving_statistics(again), moving_statistics(two)):
        np.testing.assert_array_equal(a, b)


def test_a_worker_lost_in_an_exchange_means_the_step_once_in_one_process(monkeypatch):
    """The worker dies while this process waits for its sums (at the second BatchNormalization, after the first
    has updated its moving statistics): the step is computed again in one process, from the moving statistics
    it began with (updated once, not twice), with one warning."""
    needs_split()
    x, y = data(32, True)
    one, two = bn_model(), bn_model()
    loss_1, _, grads_1 = one_thread_step(one, x, y, monkeypatch)
    parallel.split_step(two, x, y)  # a worker that holds the model
    two = bn_model()
    original, calls = parallel._Exchange.__call__, []

    def kill_then_exchange(self, mine):
        calls.append(1)
        if len(calls) == 2:
            kill_worker()
        return original(self, mine)

    monkeypatch.setattr(parallel._Exchange, "__call__", kill_then_exchange)
    two._grads[...] = np.nan
    with pytest.warns(RuntimeWarning, match="second training process failed.*one process"):
        loss_2, _ = parallel.split_step(two, x, y)
    np.testing.assert_allclose(float(loss_2), loss_1, rtol=1e-5)
    np.testing.assert_allclose(grads(two), grads_1, rtol=1e-4, atol=1e-5 * np.abs(grads_1).max())
    for got, want in zip(moving_statistics(two), moving_statistics(one)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_ctrl_c_in_a_half_that_exchanges_stops_the_worker_and_the_next_step_is_right(monkeypatch):
    """Interrupted between two exchanges, this process stops the worker (it waits for sums that will not come)
    rather than waiting for its reply; the next split step starts a fresh one, without a warning."""
    needs_split()
    x, y = data(32, True)
    m = bn_model()
    parallel.split_step(m, x, y)
    worker = parallel._state["worker"]
    original, calls = parallel._Exchange.__call__, []

    def interrupted(self, mine):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, mine)

    monkeypatch.setattr(parallel._Exchange, "__call__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        parallel.split_step(m, x, y)
    assert parallel._state["worker"] is None and worker.process.poll() is not None
    monkeypatch.setattr(parallel._Exchange, "__call__", original)
    before = [layer.get_weights() for layer in m._all_layers()]
    want_loss, _, want_grads = one_thread_step(m, x, y, monkeypatch)
    for layer, weights in zip(m._all_layers(), before):
        layer.set_weights(weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m._grads[...] = np.nan
        loss, _ = parallel.split_step(m, x, y)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(grads(m), want_grads, rtol=1e-4, atol=1e-5 * np.abs(want_grads).max())


def test_a_frozen_batch_normalization_does_not_exchange(monkeypatch):
    """Inference mode (trainable = False): the moving statistics, nothing to exchange."""
    needs_split()
    calls = []
    original = parallel._Exchange.__call__
    monkeypatch.setattr(parallel._Exchange, "__call__", lambda self, mine: calls.append(1) or original(self, mine))
    x, y = data(32, True)
    parallel.split_step(frozen_model(), x, y)
    assert calls == []
    parallel.split_step(frozen_model(bn_trainable=True), x, y)
    assert len(calls) == 2  # one BatchNormalization: its forward and its backward


def test_layers_frozen_between_split_fits_stay_as_they_were():
    """fit on two processes, freeze the first convolution and the BatchNormalization (no compile), fit again: both
    halves train the new set of weights (before, the worker's buffer no longer matched the model's: it failed,
    and the step went on in one process with the frozen layers still training)."""
    needs_split()
    m = frozen_model(bn_trainable=True)
    m.layers[0].trainable = True
    m.compile("rmsprop", "sparse_categorical_crossentropy")
    x, y = data(64, True)
    m.fit(x, y, batch_size=32, verbose=0)
    m.layers[0].trainable = m.layers[1].trainable = False
    before = [w.copy() for layer in m.layers[:2] for w in layer.get_weights()]
    dense = m.layers[-1].get_weights()[0].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.fit(x, y, batch_size=32, verbose=0)
    for a, b in zip(before, [w for layer in m.layers[:2] for w in layer.get_weights()]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(dense, m.layers[-1].get_weights()[0])


def test_blas_threads_are_restored_after_a_step_and_after_a_failing_half():
    """This process's half runs on one OpenBLAS thread, the count restored after, also when the half fails;
    a failed half leaves no reply behind: the next step is right."""
    needs_split()
    get, _ = parallel._openblas_threads()
    before = get()
    m = small_model()
    m.compile("rmsprop", "categorical_crossentropy")
    m.build()
    x, y = data(32, False)
    seen = []
    original = models.Sequential._forward_backward

    def forward_backward(model, xb, yb, scale=None, values=None, exchange=None):
        seen.append(get())
        return original(model, xb, yb, scale, values, exchange)

    def failing(model, xb, yb, scale=None, values=None, exchange=None):
        raise KeyboardInterrupt

    try:
        models.Sequential._forward_backward = forward_backward
        parallel.split_step(m, x, y)
        assert seen == [1] and get() == before  # this process's half, on one thread; the count restored after
        models.Sequential._forward_backward = failing
        with pytest.raises(KeyboardInterrupt):
            parallel.split_step(m, x, y)
        assert get() == before
    finally:
        models.Sequential._forward_backward = original
    x, y = data(33, False)  # other data: a reply left over from the failed step would give other numbers
    m._grads[...] = np.nan
    loss, _ = parallel.split_step(m, x, y)
    assert parallel._state["failed"] is None and np.isfinite(grads(m)).all()
    m2 = small_model()
    m2.compile("rmsprop", "categorical_crossentropy")
    m2.build()
    m2.set_weights(m.get_weights())
    m2._grads[...] = np.nan
    with parallel.blas_threads(1):
        loss_1, _ = m2._forward_backward(x, y, 1.0)
    np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-5)
    np.testing.assert_allclose(grads(m), grads(m2), rtol=1e-4, atol=1e-6 * np.abs(grads(m2)).max())


def test_models_that_take_turns_each_get_their_own_step(monkeypatch):
    """The worker holds one model at a time: a step of another model (or of another shape) sets it up again."""
    needs_split()
    a, b = small_model(), small_model()
    a.compile("rmsprop", "categorical_crossentropy")
    b.compile("rmsprop", "sparse_categorical_crossentropy")
    a.build(), b.build()
    b.set_weights([w * 0.5 for w in b.get_weights()])
    xa, ya = data(40, False)
    xb, yb = data(64, True)
    for _ in range(2):
        for m, x, y in ((a, xa, ya), (b, xb, yb), (a, xa[:33], ya[:33])):
            want_loss, _, want_grads = one_thread_step(m, x, y, monkeypatch)
            m._grads[...] = np.nan
            loss, _ = parallel.split_step(m, x, y)
            np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
            np.testing.assert_allclose(grads(m), want_grads, rtol=1e-4, atol=1e-6 * np.abs(want_grads).max())


def after_a_split_step():
    """A small model, a batch of 32, and a worker that has computed a step of it."""
    needs_split()
    m = small_model()
    m.compile("rmsprop", "categorical_crossentropy")
    m.build()
    x, y = data(32, False)
    parallel.split_step(m, x, y)
    return m, x, y


def kill_worker():
    worker = parallel._state["worker"]
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.wait()


@pytest.mark.parametrize("when", ["between steps", "during a step"])
def test_a_dead_worker_means_a_warning_and_one_process(when, monkeypatch):
    """The worker killed between steps or while it computes its half: the step is computed in this process,
    right, with one warning; later steps run in one process and say why; no shared file is left behind."""
    m, x, y = after_a_split_step()
    want_loss, want_correct, want_grads = one_thread_step(m, x, y, monkeypatch)
    m._grads[...] = np.nan
    if when == "between steps":
        kill_worker()
    else:  # after the worker got its half (stopped, so that it cannot answer first), before this process asks
        original, send = models.Sequential._forward_backward, parallel._Worker.send

        def stop_then_send(worker, message):
            os.kill(worker.process.pid, signal.SIGSTOP)
            send(worker, message)

        monkeypatch.setattr(parallel._Worker, "send", stop_then_send)

        def kill_then_run(model, xb, yb, scale=None, values=None, exchange=None):
            if parallel._state["worker"] is not None:
                kill_worker()
            return original(model, xb, yb, scale, values, exchange)

        monkeypatch.setattr(models.Sequential, "_forward_backward", kill_then_run)
    with pytest.warns(RuntimeWarning, match="second training process failed.*one process"):
        loss, correct = parallel.split_step(m, x, y)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    assert int(correct) == want_correct
    np.testing.assert_allclose(grads(m), want_grads, rtol=1e-4, atol=1e-6 * np.abs(want_grads).max())
    assert "failed earlier" in parallel.split_reason(m, 64) and parallel._state["worker"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        m._forward_backward(x, y)
    assert not glob.glob("/dev/shm/gpucnn-step-*")


def test_a_worker_that_cannot_build_the_model_means_one_process(monkeypatch):
    """An error inside the worker (here: a config it cannot build) comes back as the warning's reason."""
    needs_split()
    m = small_model()
    m.compile("rmsprop", "categorical_crossentropy")
    m.build()
    x, y = data(32, False)
    monkeypatch.setattr(m, "get_config", lambda: {"name": "bad", "layers": [{"class_name": "Lambda", "config": {}}]})
    want_loss = one_thread_step(m, x, y, monkeypatch)[0]
    with pytest.warns(RuntimeWarning, match="unknown layer class 'Lambda'"):
        loss, _ = parallel.split_step(m, x, y)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)


def test_a_stalled_worker_means_a_warning_and_one_process(monkeypatch):
    """A worker that stops answering (here: stopped by SIGSTOP) does not hang the step: after STEP_SECONDS
    the step is computed in this process, right, with one warning, and the worker is killed."""
    m, x, y = after_a_split_step()
    want_loss, _, want_grads = one_thread_step(m, x, y, monkeypatch)
    worker = parallel._state["worker"]
    os.kill(worker.process.pid, signal.SIGSTOP)
    monkeypatch.setattr(parallel, "STEP_SECONDS", 0.5)
    m._grads[...] = np.nan
    with pytest.warns(RuntimeWarning, match="second training process failed.*no answer within 0.5 s"):
        loss, _ = parallel.split_step(m, x, y)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(grads(m), want_grads, rtol=1e-4, atol=1e-6 * np.abs(want_grads).max())
    assert worker.process.poll() is not None and parallel._state["worker"] is None


def test_user_layer_classes_train_in_one_process_with_one_notice(monkeypatch):
    """The worker rebuilds layers by class name: a user's class named like a built-in (its own maths) would
    silently become the built-in there, so such a model is not split; one notice says why."""
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    monkeypatch.setattr(parallel, "_openblas_threads", lambda: (lambda: 2, lambda n: None))
    monkeypatch.delenv("GPUCNN_CPU_THREADS", raising=False)
    monkeypatch.setitem(parallel._state, "noticed", set())

    class Dense(layers.Dense):
        pass

    class MySequential(models.Sequential):
        pass

    m = small_model()
    m.layers[-1].__class__ = Dense
    with pytest.warns(RuntimeWarning, match=r"test_parallel\..*Dense, a class of its own.*one process"):
        assert "cannot rebuild" in parallel.split_reason(m, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert "cannot rebuild" in parallel.split_reason(m, 64)
    m = small_model()
    m.__class__ = MySequential
    with pytest.warns(RuntimeWarning, match="MySequential"):
        assert "cannot rebuild" in parallel.split_reason(m, 64)
    assert parallel.split_reason(small_model(), 64) is None


SILENT_WORKER = """
import os, signal, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from gpucnn import backend, layers, models
from gpucnn.models import parallel
backend.set_engine("cpu")
m = models.Sequential([layers.Conv2D(32, 3, activation="relu", input_shape=(28, 28, 1)), layers.Flatten(),
                       layers.Dense(4, activation="softmax")])
m.compile("rmsprop", "categorical_crossentropy")
m.build()
x = np.random.default_rng(0).random((2000, 28, 28, 1), dtype=np.float32)
y = np.eye(4, dtype=np.float32)[np.arange(2000) % 4]
parallel.split_step(m, x[:64], y[:64])
try:  # Ctrl-C in a terminal: SIGINT to the whole foreground process group
    os.killpg(os.getpgrp(), signal.SIGINT)
    time.sleep(5)
except KeyboardInterrupt:
    pass
parallel.split_step(m, x[:64], y[:64])
worker = parallel._state["worker"]
worker.prepare(m, x, y)
worker.send(("step", len(x), 1.0))
parallel._stop()  # while it computes: its reply has nowhere to go
parallel.split_step(m, x[:64], y[:64])
print("failed:", parallel._state["failed"])
"""


def test_the_worker_prints_nothing_on_ctrl_c_or_a_closed_pipe():
    """Ctrl-C sent to the process group, and a worker stopped while it computes: no traceback
    (KeyboardInterrupt, BrokenPipeError) reaches the user's output, and the training goes on split."""
    needs_split()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", SILENT_WORKER, root], capture_output=True, text=True,
                         timeout=120, start_new_session=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "failed: None"
    assert run.stderr == ""


DIVERGING = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from gpucnn import backend, layers, models, optimizers, utils
backend.set_engine("cpu")
utils.set_random_seed(0)
m = models.Sequential([layers.Conv2D(8, 3, activation="relu", input_shape=(12, 12, 1)), layers.Flatten(),
                       layers.Dense(4, activation="softmax")])
m.compile(optimizers.SGD(1e20), "categorical_crossentropy")
x = np.random.default_rng(0).random((640, 12, 12, 1), dtype=np.float32) * 100
y = np.eye(4, dtype=np.float32)[np.arange(640) % 4]
try:
    m.fit(x, y, batch_size=64, epochs=5, verbose=0)
except models.TrainingDivergedError:
    print("diverged")
"""


def test_a_diverging_run_says_so_once_without_warnings_from_the_worker():
    needs_split()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", DIVERGING, root], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "diverged"
    assert run.stderr == ""


def test_the_exchange_of_a_wide_batch_normalization_does_not_block():
    """Both halves send at once: an array larger than a socket's buffer (a BatchNormalization over 12,544 features
    sends 300 KB) is traded in chunks, one each way at a time, so neither send waits for ever."""
    import socket
    import threading
    from multiprocessing.connection import Connection

    a, b = socket.socketpair()
    ends = [Connection(a.detach()), Connection(b.detach())]
    arrays = [np.arange(3 * 12544, dtype=np.float64).reshape(3, -1) * (k + 1) for k in range(2)]
    got = [None, None]

    def side(k):
        got[k] = parallel.exchange_chunks(arrays[k], ends[k].send, lambda: ends[k].recv()[1])

    threads = [threading.Thread(target=side, args=(k,), daemon=True) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "the exchange blocked"
    np.testing.assert_array_equal(got[0], arrays[1])
    np.testing.assert_array_equal(got[1], arrays[0])
    for end in ends:
        end.close()


def test_the_split_step_of_a_wide_batch_normalization_gives_the_one_process_step(monkeypatch):
    needs_split()
    utils.set_random_seed(3)
    inputs = layers.Input(shape=(8,))
    x = layers.BatchNormalization()(layers.Dense(10000)(inputs))
    m = models.Model(inputs, layers.Dense(4, activation="softmax")(x))
    m.compile("sgd", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 8)).astype(np.float32), rng.integers(0, 4, 32)
    before = moving_statistics(m)
    loss_1, _, grads_1 = one_thread_step(m, x, y, monkeypatch)
    want = moving_statistics(m)
    for w, v in zip([w for layer in m._all_layers() if isinstance(layer, layers.BatchNormalization)
                     for w in layer.weights[-2:]], before):
        w[...] = v
    m._grads[...] = np.nan
    loss_2, _ = parallel.split_step(m, x, y)
    np.testing.assert_allclose(float(loss_2), loss_1, rtol=1e-5)
    np.testing.assert_allclose(grads(m), grads_1, rtol=1e-4, atol=1e-5 * np.abs(grads_1).max())
    for got, w in zip(moving_statistics(m), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
