"""The NumPy engine's training step split over two threads (gpucnn/parallel.py): the same loss, accuracy and
gradients as the one-thread step (up to float32 summation order), the same bits from run to run, OpenBLAS's
thread count restored, and the one-thread step wherever the split does not apply."""
import numpy as np
import pytest

from gpucnn import layers, models, parallel, utils

pytestmark = pytest.mark.usefixtures("numpy_engine")


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
    return np.concatenate([g.ravel() for layer in m.layers for g in layer.grads])


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


def test_fit_on_two_threads_is_repeatable_and_close_to_one_thread(monkeypatch):
    if parallel.split_reason(small_model(), 64) is not None:
        pytest.skip(f"no split step here: {parallel.split_reason(small_model(), 64)}")
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
    assert "batch under 32" in parallel.split_reason(m, 31)
    assert "Dropout" in parallel.split_reason(small_model(dropout=0.5), 64)
    monkeypatch.setenv("GPUCNN_CPU_THREADS", "1")
    assert parallel.split_reason(m, 64) == "GPUCNN_CPU_THREADS=1"
    monkeypatch.delenv("GPUCNN_CPU_THREADS")
    monkeypatch.setattr(parallel, "usable_cores", lambda: 1)
    assert parallel.split_reason(m, 64) == "one CPU core"
    monkeypatch.setattr(parallel, "usable_cores", lambda: 2)
    monkeypatch.setattr(parallel, "_openblas_threads", lambda: None)
    assert "OpenBLAS" in parallel.split_reason(m, 64)


def test_blas_threads_are_restored_after_a_step_and_after_a_failing_half():
    funcs = parallel._openblas_threads()
    if funcs is None:
        pytest.skip("NumPy's OpenBLAS not found")
    get, _ = funcs
    before = get()
    m = small_model()
    m.compile("rmsprop", "categorical_crossentropy")
    m.build()
    x, y = data(32, False)
    seen = []
    original = models.Sequential._forward_backward

    def forward_backward(model, xb, yb, scale=None):
        seen.append(get())
        return original(model, xb, yb, scale)

    models.Sequential._forward_backward = forward_backward
    try:
        parallel.split_step(m, x, y)
        assert seen == [1, 1] and get() == before  # one OpenBLAS thread per half, the count restored after

        def failing(model, xb, yb, scale=None):
            if model is not m:  # the worker's half
                raise RuntimeError("half-step failed")
            return original(model, xb, yb, scale)

        models.Sequential._forward_backward = failing
        with pytest.raises(RuntimeError, match="half-step failed"):
            parallel.split_step(m, x, y)
        assert get() == before
    finally:
        models.Sequential._forward_backward = original
