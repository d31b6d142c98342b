"""A short training run on the GPU for ``gpu_check.py``'s compute-sanitizer stage: the seed model, one epoch
over 320 random images at batch 64 (five steps, so the fast path's graphs are captured and replayed),
then ``evaluate`` over a smaller last batch. Random data, no MNIST needed.

Not named test_*.py, so ``pytest benchmarks`` does not collect it; ``gpu_check.py`` names it explicitly.
"""
import numpy as np
import pytest

from gpucnn import backend

_usable, _reason = backend.gpu_status()


@pytest.mark.gpu
@pytest.mark.skipif(not _usable, reason=f"no usable GPU: {_reason}")
def test_short_fit_and_evaluate_on_the_gpu():
    from gpucnn import utils
    from gpucnn.cli import seed_model
    backend.set_engine("gpu")
    utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((320, 28, 28, 1), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, size=320)]
    model = seed_model()
    model.compile("rmsprop", "categorical_crossentropy", ["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    loss, accuracy = model.evaluate(x[:100], y[:100], batch_size=64, verbose=0)
    assert np.isfinite(history.history["loss"][-1]) and np.isfinite(loss)
    assert 0.0 <= accuracy <= 1.0
