"""fit / evaluate / predict on what is not arrays: generators, iterables of batches, PyDatasets, image folders,
with steps_per_epoch and validation_steps as Keras uses them (NumPy engine)."""
import io

import numpy as np
import pytest

import gpucnn as keras
from gpucnn import layers

pytestmark = pytest.mark.usefixtures("numpy_engine")


def model():
    m = keras.Sequential([keras.Input((6, 6, 1)), layers.Conv2D(4, 3, activation="relu"), layers.Flatten(),
                          layers.Dense(3, activation="softmax")])
    m.compile("rmsprop", "sparse_categorical_crossentropy", metrics=["acc"])
    return m


def arrays(n=48, seed=0):
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n)
    x = r.random((n, 6, 6, 1)).astype(np.float32) * 0.1
    x[np.arange(n), y * 2, y * 2, 0] += 1
    return x, y


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, i):
        return self.x[i * self.size:(i + 1) * self.size], self.y[i * self.size:(i + 1) * self.size]


def test_a_pydataset_a_list_of_batches_and_arrays_train_alike():
    """The same batches in the same order: the same weights, whichever way they come."""
    x, y = arrays()
    results = []
    for source in ("arrays", "pydataset", "list", "generator"):
        keras.utils.set_random_seed(3)
        m = model()
        if source == "arrays":
            h = m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        elif source == "pydataset":
            h = m.fit(Batches(x, y, 16), epochs=2, shuffle=False, verbose=0)
        elif source == "list":
            h = m.fit([(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)], epochs=2, shuffle=False, verbose=0)
        else:
            gen = ((x[i:i + 16], y[i:i + 16]) for _ in range(2) for i in range(0, 48, 16))
            h = m.fit(gen, steps_per_epoch=3, epochs=2, verbose=0)
        results.append((m.get_weights(), h.history))
    for w, hist in results[1:]:
        assert hist == results[0][1]
        for a, b in zip(w, results[0][0]):
            np.testing.assert_array_equal(a, b)
    assert set(results[0][1]) == {"loss", "acc"}  # the metric's name as written


def test_validation_data_evaluate_and_predict_take_datasets():
    x, y = arrays()
    m = model()
    h = m.fit(Batches(x, y, 16), validation_data=Batches(x[:32], y[:32], 8), epochs=2, verbose=0)
    assert set(h.history) == {"loss", "acc", "val_loss", "val_acc"}
    want = m.evaluate(x[:32], y[:32], verbose=0)
    np.testing.assert_allclose(m.evaluate(Batches(x[:32], y[:32], 8), verbose=0), want, rtol=1e-6)
    np.testing.assert_allclose(m.evaluate(Batches(x, y, 8), steps=4, verbose=0), want, rtol=1e-6)
    p = m.predict(((x[i:i + 10],) for i in range(0, 48, 10)), verbose=0)
    np.testing.assert_allclose(p, m.predict(x, verbose=0), rtol=1e-6)
    h = m.fit(Batches(x, y, 16), validation_data=Batches(x, y, 8), validation_steps=2, epochs=1, verbose=0)
    assert "val_acc" in h.history


def test_a_generator_that_raises_mid_epoch_surfaces_and_leaves_the_model_usable():
    x, y = arrays()
    m = model()

    def broken():
        yield x[:16], y[:16]
        raise RuntimeError("the disk went away")

    with pytest.raises(RuntimeError, match="the disk went away"):
        m.fit(broken(), epochs=1, verbose=0)
    m.fit(x, y, epochs=1, verbose=0)
    assert np.isfinite(m.evaluate(x, y, verbose=0)[0])


def test_a_generator_that_runs_out_stops_training_with_keras_warning():
    x, y = arrays()
    m = model()
    gen = ((x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16))  # 3 batches in all
    with pytest.warns(UserWarning, match="Your input ran out of data"):
        h = m.fit(gen, steps_per_epoch=2, epochs=3, verbose=0)
    assert len(h.history["loss"]) == 2  # epoch 2 got one batch; epoch 3 none: training stopped


def test_unknown_length_shows_keras_unknown_progress(capsys):
    x, y = arrays()
    m = model()
    m.fit(((x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)), epochs=1, verbose=1)
    out = capsys.readouterr().out
    assert out.startswith("3/Unknown") and "acc:" in out


def test_bad_datasets_get_clear_errors():
    x, y = arrays()
    m = model()
    with pytest.raises(ValueError, match="`y` should not be passed"):
        m.fit(Batches(x, y, 16), y, verbose=0)
    with pytest.raises(ValueError, match="validation_split is only supported for arrays"):
        m.fit(Batches(x, y, 16), validation_split=0.2, verbose=0)
    with pytest.raises(ValueError, match="no labels"):
        m.fit(((x[i:i + 16],) for i in range(0, 48, 16)), verbose=0)
    with pytest.raises(ValueError, match="lack the channel axis"):
        m.fit([(x[:16, ..., 0], y[:16])], verbose=0)
    with pytest.raises(NotImplementedError, match="sample_weight"):
        m.fit(x, y, sample_weight=np.ones(48), verbose=0)


def test_an_image_folder_trains_with_the_books_code(tmp_path):
    """Two classes of generated pictures (a bright square left or right), read with image_dataset_from_directory
    and trained with the book's calls, reach high validation accuracy."""
    image = pytest.importorskip("PIL.Image")
    r = np.random.default_rng(0)
    for label in ("left", "right"):
        (tmp_path / label).mkdir()
        for i in range(40):
            a = (r.random((16, 16, 3)) * 60).astype(np.uint8)
            col = 2 if label == "left" else 9
            a[5:11, col:col + 5] = 230
            image.fromarray(a).save(tmp_path / label / f"{i}.png")
    train, val = keras.utils.image_dataset_from_directory(tmp_path, image_size=(16, 16), batch_size=8,
                                                          validation_split=0.25, subset="both", seed=1)
    assert train.class_names == ["left", "right"]
    m = keras.Sequential([keras.Input((16, 16, 3)), layers.Conv2D(8, 3, activation="relu"), layers.MaxPooling2D(2),
                          layers.Flatten(), layers.Dense(2, activation="softmax")])
    m.compile("rmsprop", "sparse_categorical_crossentropy", metrics=["accuracy"])
    out = io.StringIO()
    h = m.fit(train, epochs=8, validation_data=val, verbose=0, callbacks=[keras.callbacks.History()])
    assert h.history["val_accuracy"][-1] >= 0.9, h.history
    assert not out.getvalue()


class Logged(Batches):
    """Batches that record which index is read."""

    def __init__(self, x, y, size, reads):
        super().__init__(x, y, size)
        self.reads = reads

    def __getitem__(self, i):
        self.reads.append(i)
        return super().__getitem__(i)


def test_validation_steps_read_the_same_batches_every_epoch():
    """Keras validates on the same validation_steps batches each epoch (gpucnn went on through the data: each
    epoch's val_loss was of other samples, and a false "ran out of data" came in the third)."""
    x, y = arrays()
    reads = []
    m = model()
    h = m.fit(x, y, epochs=3, verbose=0, validation_data=Logged(x[:40], y[:40], 8, reads), validation_steps=2)
    assert reads == [0, 1] * 3
    m2 = model()
    m2.set_weights(m.get_weights())
    assert h.history["val_loss"][-1] == pytest.approx(m2.evaluate(x[:16], y[:16], verbose=0)[0], rel=1e-6)


def test_steps_with_arrays_and_no_batch_size_take_kerass_batch_size():
    """predict/evaluate(steps=k) and fit(steps_per_epoch=k) on arrays without batch_size: batches of
    ceil(N / k), so every sample is read (they took batches of 32: 32 of 40 samples, fewer steps)."""
    x, y = arrays(40)
    m = model()
    assert m.predict(x, steps=1, verbose=0).shape == (40, 3)
    assert m.evaluate(x, y, steps=1, verbose=0)[0] == pytest.approx(m.evaluate(x, y, verbose=0)[0], rel=1e-6)
    steps = []
    cb = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: steps.append(batch))
    m.fit(x, y, steps_per_epoch=3, verbose=0, callbacks=[cb])
    assert steps == [0, 1, 2]


def test_validation_data_forms_keras_takes():
    """(x_val, y_val) with validation_steps, (x_val, y_val, None), and validation_split with steps_per_epoch (each
    refused before); sample weights are refused by name."""
    x, y = arrays()
    m = model()
    for kwargs in ({"validation_data": (x[:16], y[:16]), "validation_steps": 1},
                   {"validation_data": (x[:16], y[:16], None)},
                   {"validation_split": 0.25, "steps_per_epoch": 2}):
        h = m.fit(x, y, batch_size=8, verbose=0, **kwargs)
        assert "val_loss" in h.history, kwargs
    with pytest.raises(NotImplementedError, match="sample weights"):
        m.fit(x, y, verbose=0, validation_data=(x, y, np.ones(48)))
    for lone in ((x,), [x]):  # labels forgotten: said before any training (was a bare TypeError)
        with pytest.raises(ValueError, match="validation_data must be a tuple \\(x_val, y_val\\).* of 1: give the labels"):
            m.fit(x, y, verbose=0, validation_data=lone)
    with pytest.raises(ValueError, match="list of 1: give the pair itself, validation_data=\\(x_val, y_val\\)"):
        m.fit(x, y, verbose=0, validation_data=[(x, y)])
    with pytest.raises(NotImplementedError, match="evaluate\\(sample_weight=...\\) is not supported"):
        m.evaluate(x, y, verbose=0, sample_weight=np.ones(48))
    assert m.evaluate(x, y, 16, 0, None, None, None, True) == m.evaluate(x, y, verbose=0, return_dict=True)  # Keras's order
    xv, yv = arrays(100, seed=1)  # no batch size: Keras's ceil(100 / 2) for the validation batches, all 100 read
    h = m.fit(x, y, verbose=0, validation_data=(xv, yv), validation_steps=2)
    assert h.history["val_loss"][0] == pytest.approx(m.evaluate(xv, yv, verbose=0)[0], rel=1e-5)


def test_a_validation_generator_that_runs_out_says_so():
    x, y = arrays()
    m = model()
    once = ((x[i:i + 16], y[i:i + 16]) for i in range(0, 32, 16))
    with pytest.raises(ValueError, match="validation_data has run out of batches.*read only once"):
        m.fit(x, y, epochs=2, verbose=0, validation_data=once)


def _hooks_of(module):
    """The epoch hooks a PyDataset of ``module`` (gpucnn or Keras) sees through fit (with validation), evaluate and
    predict, in order."""
    calls = []

    class Hooks(module.utils.PyDataset):
        def __init__(self, tag):
            super().__init__()
            r = np.random.default_rng(0)
            self.tag, self.x, self.y = tag, r.random((16, 4), dtype=np.float32), np.arange(16) % 2

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return self.x[i * 8:(i + 1) * 8], self.y[i * 8:(i + 1) * 8]

        def on_epoch_begin(self):
            calls.append(self.tag + ".begin")

        def on_epoch_end(self):
            calls.append(self.tag + ".end")

    model = module.Sequential([module.Input((4,)), module.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(Hooks("t"), epochs=1, verbose=0)  # (Keras's first fit also peeks: begin, before its end)
    calls.clear()
    mark = module.callbacks.LambdaCallback(on_train_begin=lambda logs: calls.append("train_begin"))
    model.fit(Hooks("t"), epochs=2, verbose=0, validation_data=Hooks("v"), callbacks=[mark])
    model.evaluate(Hooks("e"), verbose=0)
    model.predict(Hooks("p"), verbose=0)
    return calls


def test_a_pydatasets_on_epoch_end_runs_once_before_its_first_batch_as_in_keras():
    """Keras resets its epoch iterator before fit's first epoch, each validation and evaluate (not predict), which
    calls the dataset's on_epoch_end: a PyDataset that reshuffles there (keras.io's idiom) has reshuffled before its
    first batch."""
    assert _hooks_of(keras) == ["t.end", "train_begin", "t.begin", "t.end", "v.end", "v.begin", "v.end", "t.begin", "t.end",
                                "v.end", "v.begin", "v.end", "e.end", "e.begin", "e.end", "p.begin", "p.end"]


def test_a_pydatasets_epoch_hooks_match_keras():
    k = pytest.importorskip("keras", reason="Keras 3 is the oracle where it is installed (not a dependency)")
    assert _hooks_of(keras) == _hooks_of(k)
