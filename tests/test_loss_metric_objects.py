"""Loss and metric objects used outside fit, as Keras's are: ``loss_fn(y_true, y_pred)`` (the quickstart's idiom),
a metric's ``update_state`` / ``result`` / ``reset_state``, and ``from_config``; checked against float64 formulas
here and against Keras 3 where it is installed."""
import numpy as np
import pytest

import gpucnn as keras
from gpucnn import losses, metrics

R = np.random.default_rng(0)
P = R.random((6, 3)).astype(np.float32)
LABELS = R.integers(0, 3, 6)
ONE_HOT = np.eye(3, dtype=np.float32)[LABELS]


def test_a_loss_object_called_gives_the_batch_mean():
    z = P.astype(np.float64)
    log_softmax = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    want = -log_softmax[np.arange(6), LABELS].mean()
    got = losses.SparseCategoricalCrossentropy(from_logits=True)(LABELS, P)
    assert got.dtype == np.float32 and got.shape == () and float(got) == pytest.approx(want, rel=1e-6)
    q = np.clip(z / z.sum(1, keepdims=True), 1e-7, 1 - 1e-7)
    assert float(losses.CategoricalCrossentropy()(ONE_HOT, P)) == pytest.approx(-np.log(q[np.arange(6), LABELS]).mean(),
                                                                              rel=1e-6)
    y, p = np.array([1, 0, 1.0]), np.array([0.8, 0.3, 0.6])  # (N,) outputs of one unit, as Keras takes them
    want = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()
    assert float(losses.BinaryCrossentropy()(y, p).numpy()) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="label 3 at index 0 of y_true is out of range"):
        losses.SparseCategoricalCrossentropy()(np.array([3]), P[:1])
    with pytest.raises(NotImplementedError, match="sample weights"):
        losses.SparseCategoricalCrossentropy()(LABELS, P, sample_weight=np.ones(6))
    again = losses.SparseCategoricalCrossentropy.from_config(losses.SparseCategoricalCrossentropy(from_logits=True)
                                                             .get_config())
    assert again.from_logits and float(again(LABELS, P)) == float(got)


def test_a_metric_object_counts_batches_as_keras():
    m = metrics.SparseCategoricalAccuracy()
    assert float(m.result()) == 0.0  # nothing counted yet
    m.update_state(LABELS[:4], P[:4])
    m.update_state(LABELS[4:, None], P[4:])  # (N, 1) labels too
    assert float(m.result()) == pytest.approx(np.mean(P.argmax(1) == LABELS))
    m.reset_state()
    assert float(m.result()) == 0.0
    c = metrics.CategoricalAccuracy.from_config(metrics.CategoricalAccuracy(name="hits").get_config())
    c.update_state(ONE_HOT, P)
    assert c.name == "hits" and float(c.result()) == pytest.approx(np.mean(P.argmax(1) == LABELS))
    b = metrics.BinaryAccuracy()
    b.update_state(np.array([1, 0, 1, 0.7]), np.array([0.7, 0.2, 0.4, 0.9]))  # a soft label never matches (Keras)
    assert float(b.result()) == 0.5
    e = metrics.Accuracy()
    e.update_state([1, 2, 3], [1, 2, 4])
    assert float(e.result()) == pytest.approx(2 / 3)
    with pytest.raises(NotImplementedError, match="sample weights"):
        b.update_state([1.0], [0.9], sample_weight=[1.0])


def test_loss_and_metric_objects_match_keras():
    k = pytest.importorskip("keras", reason="Keras 3 is the oracle where it is installed (not a dependency)")
    for name, y, p in (("SparseCategoricalCrossentropy", LABELS, P), ("CategoricalCrossentropy", ONE_HOT, P),
                       ("BinaryCrossentropy", np.array([[1], [0], [1.0]]), np.array([[0.8], [-0.3], [0.6]]))):
        for kwargs in ({}, {"from_logits": True}):
            ours = float(getattr(keras.losses, name)(**kwargs)(y, p))
            theirs = float(k.ops.convert_to_numpy(getattr(k.losses, name)(**kwargs)(y, p)))
            assert ours == pytest.approx(theirs, rel=1e-5), (name, kwargs)
    for name, y, p in (("SparseCategoricalAccuracy", LABELS, P), ("CategoricalAccuracy", ONE_HOT, P),
                       ("BinaryAccuracy", np.array([1, 0, 1, 0.0]), np.array([0.7, 0.2, 0.4, 0.6]))):
        ours, theirs = getattr(keras.metrics, name)(), getattr(k.metrics, name)()
        for m in (ours, theirs):
            m.update_state(y[:2], p[:2])
            m.update_state(y[2:], p[2:])
        assert float(ours.result()) == pytest.approx(float(k.ops.convert_to_numpy(theirs.result())), rel=1e-6), name


def test_a_metric_compares_outputs_and_labels_of_one_more_axis_as_keras():
    """(N, 1) against (N,) either way: Keras brings them to one rank (NumPy would broadcast them to N x N)."""
    b = metrics.BinaryAccuracy()
    b.update_state([[1], [0], [0], [0]], [0.9, 0.1, 0.2, 0.3])
    b.update_state([1, 0], [[0.9], [0.6]])
    assert float(b.result()) == pytest.approx(5 / 6)
    e = metrics.Accuracy()
    e.update_state([[1], [2], [3]], [1, 2, 3])
    assert float(e.result()) == 1.0
    s = metrics.SparseCategoricalAccuracy()  # one output unit: its arg-max is 0 for every sample (Keras's too)
    s.update_state([0, 0, 0, 0], np.ones((4, 1)))
    assert float(s.result()) == 1.0 and s._count == 4


def test_compile_refuses_a_metric_class_of_ones_own_and_keeps_the_state_of_its_own_objects():
    """A user's Metric subclass was logged under its name with gpucnn's accuracy (its update_state never ran);
    gpucnn's own objects hold the counts fit and evaluate read last, as Keras's compiled metrics do."""
    class MeanMax(metrics.Metric):
        def update_state(self, y_true, y_pred, sample_weight=None):
            pass

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(ValueError, match=r"metrics=\[MeanMax\(...\)\]\): fit computes gpucnn's own accuracies only"):
        model.compile("sgd", "sparse_categorical_crossentropy", [MeanMax(name="mean_max")])

    class Mine(metrics.SparseCategoricalAccuracy):
        pass
    with pytest.raises(ValueError, match="fit computes gpucnn's own accuracies only"):
        model.compile("sgd", "sparse_categorical_crossentropy", [Mine()])
    hits = metrics.SparseCategoricalAccuracy(name="hits")
    hits.update_state([0, 1], [[0.9, 0.1, 0.0], [0.1, 0.9, 0.0]])  # 1.0 before compile: fit starts its own count
    model.compile("sgd", "sparse_categorical_crossentropy", [hits])
    history = model.fit(P, LABELS, batch_size=4, epochs=2, verbose=0)
    assert float(hits.result()) == pytest.approx(history.history["hits"][-1], rel=1e-6)
    logs = model.evaluate(P[:4], LABELS[:4], verbose=0, return_dict=True)
    assert float(hits.result()) == pytest.approx(logs["hits"], rel=1e-6)


def test_keras_loss_configs_and_dtypes_gpucnn_does_not_compute_in():
    config = {"name": "sparse_categorical_crossentropy", "reduction": "sum_over_batch_size", "from_logits": True,
              "ignore_class": None}  # as Keras writes it
    assert losses.SparseCategoricalCrossentropy.from_config(config).from_logits
    with pytest.raises(NotImplementedError, match="ignore_class=255"):
        losses.SparseCategoricalCrossentropy(ignore_class=255)
    with pytest.raises(TypeError, match="ignore_class"):  # only the sparse loss has it (Keras's too)
        losses.CategoricalCrossentropy(ignore_class=None)
    for dtype in (np.dtype("float64"), np.float64, "float16", "mixed_float16"):  # (np.dtype('float64') == None)
        with pytest.raises(ValueError, match="float32 only"):
            keras.layers.Dense(2, dtype=dtype)
        with pytest.raises(ValueError, match="float32"):
            keras.layers.Dense(2).add_weight(shape=(2,), dtype=dtype)
