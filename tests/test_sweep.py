"""The seed exercise: variants of the seed model, ``run_sweep`` on a tiny data set, ``gpucnn sweep``."""
import importlib.util
import json

import numpy as np
import pytest

from gpucnn import cli, examples, layers, sweep, utils


pytestmark = pytest.mark.usefixtures("numpy_engine")


def fake_mnist(n=600, seed=0):
    """MNIST-shaped data (28x28x1 images, one-hot labels) whose class is the row of a bright bar."""
    r = np.random.default_rng(seed)
    labels = r.integers(0, 10, n)
    x = r.random((n, 28, 28, 1)).astype(np.float32) * 0.2
    for i, c in enumerate(labels):
        x[i, 2 + 2 * c:4 + 2 * c, 4:24, 0] = 1.0
    return x, utils.to_categorical(labels, 10)


def test_the_seed_variant_is_the_seed_model():
    seed = sweep.build_variant()
    reference = cli.seed_model()
    assert [type(l) for l in seed.layers] == [type(l) for l in reference.layers]
    assert seed.count_params() == reference.count_params() == 93322


def test_variants_layouts():
    no_pool = sweep.build_variant(pooling=None)  # the book's model without max-pooling, with its head
    assert not any(isinstance(l, layers.MaxPooling2D) for l in no_pool.layers)
    assert no_pool.layers[2].output_shape == (22, 22, 64) and no_pool.count_params() == 2038922
    avg = sweep.build_variant(pooling="avg")
    assert sum(isinstance(l, layers.AveragePooling2D) for l in avg.layers) == 2
    two = sweep.build_variant((32, 64), kernel_size=5)
    assert two.layers[2].output_shape == (8, 8, 64)
    with pytest.raises(ValueError, match="pooling must be 'max', 'avg' or None"):
        sweep.build_variant(pooling="min")
    names = [v["name"] for v in sweep.DEFAULT_VARIANTS]
    assert names[0] == "seed" and "no pooling" in names and len(set(names)) == len(names)


def test_run_sweep_on_a_tiny_set(capsys):
    variants = [{"name": "seed"}, {"name": "small, no pooling", "filters": (4, 8), "pooling": None}]
    results = sweep.run_sweep(variants, train_size=64, val_size=32, epochs=1, batch_size=32,
                              data=fake_mnist(128))
    assert [r["name"] for r in results] == ["seed", "small, no pooling"]
    assert set(results[0]) >= {"name", "blocks", "filters", "kernel_size", "pooling", "params",
                               "val_accuracy", "val_loss", "seconds"}
    assert results[0]["params"] == 93322 and results[0]["blocks"] == 3
    assert results[0]["filters"] == [32, 64, 64]
    assert results[1]["pooling"] == "none" and results[1]["kernel_size"] == 3
    assert all(0 <= r["val_accuracy"] <= 1 and r["seconds"] > 0 for r in results)
    json.dumps(results)  # plain values, ready to save
    out = capsys.readouterr().out
    assert "training on samples 0-63, validating on 96-127" in out
    header = next(line for line in out.splitlines() if line.startswith("name"))
    assert header.split() == ["name", "blocks", "filters", "kernel_size", "pooling", "params",
                              "val_accuracy", "val_loss", "seconds"]
    assert "32-64-64" in out and "3x3" in out and "93,322" in out


def test_the_same_seed_gives_the_same_results():
    kwargs = dict(variants=[{"name": "tiny", "filters": (4,), "pooling": None}], train_size=64,
                  val_size=32, epochs=1, verbose=0, data=fake_mnist(96))
    a, b = sweep.run_sweep(**kwargs), sweep.run_sweep(**kwargs)
    assert (a[0]["val_loss"], a[0]["val_accuracy"]) == (b[0]["val_loss"], b[0]["val_accuracy"])


def test_sizes_must_fit_the_data():
    with pytest.raises(ValueError, match="exceeds the 100 samples"):
        sweep.run_sweep(train_size=80, val_size=40, data=fake_mnist(100), verbose=0)
    with pytest.raises(ValueError, match="must be positive"):
        sweep.run_sweep(train_size=0, data=fake_mnist(100), verbose=0)


def test_gpucnn_sweep_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(examples, "load_mnist", lambda *a: (fake_mnist(600), None))
    monkeypatch.setattr(sweep, "QUICK_VARIANTS", [{"name": "seed"}, {"name": "2 blocks",
                                                                     "filters": (8, 8)}])
    assert cli.main(["sweep", "--quick", "--train-size", "64", "--out", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["name"] for r in results] == ["seed", "2 blocks"]
    out = capsys.readouterr().out
    assert "training on samples 0-63, validating on 100-599 (epochs 1, batch 64, seed 0)" in out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
