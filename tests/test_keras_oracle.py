"""Keras 3 as the oracle for the functional API: the same graph built in both, Keras's weights moved into gpucnn,
then the same predictions, loss and weights after two RMSprop steps. Runs only where Keras is installed (a scratch
environment: ``pip install keras torch`` and ``KERAS_BACKEND=torch``); Keras is never a dependency of gpucnn."""
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras_ref = pytest.importorskip("keras")

import gpucnn  # noqa: E402
from helpers import summary_lines  # noqa: E402
from gpucnn import layers  # noqa: E402

pytestmark = pytest.mark.usefixtures("numpy_engine")


def build(lib):
    """A residual Add and a Concatenate, in ``lib``'s API (keras or gpucnn: the same code)."""
    L = lib.layers
    inputs = lib.Input(shape=(9, 9, 2))
    a = L.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    b = L.Conv2D(4, 3, padding="same")(a)
    c = L.Add()([a, b])
    d = L.Concatenate()([c, L.Conv2D(3, 1, activation="relu")(inputs)])
    e = L.MaxPooling2D(2)(L.Conv2D(6, 3, activation="relu")(d))
    x = L.Dense(16, activation="relu")(L.Flatten()(e))
    return lib.Model(inputs, L.Dense(5, activation="softmax")(x))


def test_a_residual_and_concatenating_model_matches_keras():
    keras_ref.utils.set_random_seed(0)
    ref = build(keras_ref)
    ours = build(gpucnn)
    assert ours.count_params() == ref.count_params()
    ours.set_weights(ref.get_weights())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 9, 9, 2)).astype(np.float32)
    y = rng.integers(0, 5, 12)
    np.testing.assert_allclose(ours.predict(x, verbose=0), np.asarray(ref.predict(x, verbose=0)), rtol=1e-4,
                               atol=1e-6)
    for m in (ref, ours):
        m.compile(optimizer=(keras_ref if m is ref else gpucnn).optimizers.RMSprop(learning_rate=0.01),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    loss_ref = float(ref.evaluate(x, y, verbose=0)[0])
    loss_ours = ours.evaluate(x, y, verbose=0)[0]
    np.testing.assert_allclose(loss_ours, loss_ref, rtol=1e-5)
    for m in (ref, ours):  # two steps of 6 samples, in order
        m.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(ours.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(ours.evaluate(x, y, verbose=0)[0], float(ref.evaluate(x, y, verbose=0)[0]), rtol=1e-4)


def test_the_summary_is_keras_summary(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    keras_ref.utils.clear_session()
    gpucnn.utils.clear_session()
    ref, ours = build(keras_ref), build(gpucnn)
    assert summary_lines(ours) == summary_lines(ref)


def test_a_sigmoid_model_with_binary_crossentropy_matches_keras():
    """Predictions with Keras's weights, the binary cross-entropy, and the weights after two RMSprop steps."""
    def head(lib):
        inputs = lib.Input(shape=(6,))
        x = lib.layers.Dense(5, activation="tanh")(inputs)
        x = lib.layers.Dense(4, activation="gelu")(x)
        return lib.Model(inputs, lib.layers.Dense(1, activation="sigmoid")(x))
    keras_ref.utils.set_random_seed(1)
    ref, ours = head(keras_ref), head(gpucnn)
    ours.set_weights(ref.get_weights())
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    y = (rng.random(10) > 0.5).astype(np.float32)
    np.testing.assert_allclose(ours.predict(x, verbose=0), np.asarray(ref.predict(x, verbose=0)), rtol=1e-5,
                               atol=1e-6)
    for m, lib in ((ref, keras_ref), (ours, gpucnn)):
        m.compile(optimizer=lib.optimizers.RMSprop(learning_rate=0.01), loss="binary_crossentropy",
                  metrics=["accuracy"])
    np.testing.assert_allclose(ours.evaluate(x, y, verbose=0), ref.evaluate(x, y, verbose=0), rtol=1e-5)
    for m in (ref, ours):
        m.fit(x, y, batch_size=5, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(ours.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-3, atol=1e-5)


def branchy_graphs(lib):
    """Graphs whose call order differs from Keras's layer order: a projection shortcut made after the block's
    main path, one made before it (same shapes everywhere: a wrong order would load silently), a shared layer
    called at two depths, a Concatenate of branches of different lengths, a nested model."""
    L = lib.layers
    graphs = {}
    inputs = lib.Input(shape=(8, 8, 3))
    x = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    y = L.BatchNormalization(name="bn_a")(L.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv_a")(x))
    y = L.BatchNormalization(name="bn_b")(L.Conv2D(8, 3, padding="same", use_bias=False, name="conv_b")(y))
    s = L.BatchNormalization(name="bn_s")(L.Conv2D(8, 1, strides=2, use_bias=False, name="conv_s")(x))
    graphs["projection"] = lib.Model(inputs, L.Add(name="add")([y, s]), name="projection")
    inputs = lib.Input(shape=(8, 8, 3))
    stem = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    short = L.Conv2D(4, 1, name="short")(stem)
    main = L.Conv2D(4, 3, padding="same", name="main2")(L.Conv2D(4, 3, padding="same", name="main1")(stem))
    graphs["shortcut first"] = lib.Model(inputs, L.Add(name="add")([main, short]), name="shortcut_first")
    inputs = lib.Input(shape=(6, 6, 4))
    shared = L.Conv2D(4, 3, padding="same", name="shared")
    a = shared(L.Conv2D(4, 1, name="pre")(inputs))
    b = shared(L.Conv2D(4, 1, name="deep2")(L.Conv2D(4, 1, name="deep1")(a)))
    graphs["shared"] = lib.Model(inputs, L.Concatenate(name="cat")([b, L.Conv2D(4, 1, name="side")(inputs)]),
                                 name="shared")
    inner_in = lib.Input(shape=(6, 6, 4))
    inner = lib.Model(inner_in, L.Conv2D(4, 3, padding="same", name="inner_conv")(inner_in), name="inner")
    inputs = lib.Input(shape=(6, 6, 4))
    graphs["nested"] = lib.Model(inputs, L.Add(name="sum")([inner(inputs), L.Conv2D(4, 1, name="outer")(inputs)]),
                                 name="nested")
    return graphs


def test_layers_and_weights_are_in_keras_order(monkeypatch):
    """model.layers, get_weights (and so set_weights) and summary follow Keras's order (by depth, not by call
    order): Keras's weights moved in by set_weights give Keras's predictions."""
    monkeypatch.setenv("COLUMNS", "100")
    keras_ref.utils.clear_session()
    gpucnn.utils.clear_session()
    keras_ref.utils.set_random_seed(3)
    refs, ours = branchy_graphs(keras_ref), branchy_graphs(gpucnn)
    x = np.random.default_rng(2).standard_normal((3, 8, 8, 3)).astype(np.float32)
    for name, ref in refs.items():
        mine = ours[name]
        assert [layer.name for layer in mine.layers[1:]] == [layer.name for layer in ref.layers[1:]], name
        assert [w.shape for w in mine.get_weights()] == [tuple(w.shape) for w in ref.get_weights()], name
        assert summary_lines(mine) == summary_lines(ref), name
        mine.set_weights(ref.get_weights())
        xs = x if name in ("projection", "shortcut first") else x[:, :6, :6, :].repeat(2, axis=3)[..., :4]
        np.testing.assert_allclose(mine.predict(xs, verbose=0), np.asarray(ref.predict(xs, verbose=0)), rtol=1e-5,
                                   atol=1e-6, err_msg=name)


@pytest.mark.parametrize("columns", ["80", "100", "140"])
def test_the_summary_with_show_trainable_is_keras_summary(columns, monkeypatch):
    """show_trainable=True: Keras's "Trainable" column (Y, N, or - for a layer without weights), its widths and
    centring, for graphs with and without branches and a frozen layer."""
    monkeypatch.setenv("COLUMNS", columns)

    def chain(lib):
        return lib.Sequential([lib.Input((8, 8, 1)), lib.layers.Conv2D(4, 3, name="conv"), lib.layers.Flatten(),
                               lib.layers.Dense(2, name="dense")], name="chain")

    for make in (chain, lambda lib: branchy_graphs(lib)["projection"], lambda lib: branchy_graphs(lib)["nested"]):
        keras_ref.utils.clear_session()
        gpucnn.utils.clear_session()
        ref, ours = make(keras_ref), make(gpucnn)
        for m in (ref, ours):
            m.layers[1].trainable = False
        assert summary_lines(ours, show_trainable=True) == summary_lines(ref, show_trainable=True)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_freezing_and_unfreezing_between_fits_trains_as_keras(optimizer):
    """Train, freeze the first layer and train, unfreeze it and train (no compile in between): Keras's weights,
    the frozen layer's optimizer state kept aside meanwhile."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = rng.integers(0, 2, 16)
    keras_ref.utils.set_random_seed(1)
    results = []
    for lib in (keras_ref, gpucnn):
        m = lib.Sequential([lib.Input((4,)), lib.layers.Dense(3), lib.layers.Dense(2, activation="softmax")])
        if results:
            m.set_weights(start)
        start = [np.asarray(w) for w in m.get_weights()]
        opt = lib.optimizers.SGD(0.1, momentum=0.9) if optimizer == "sgd_momentum" else lib.optimizers.Adam(0.05)
        m.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        for trainable in (True, False, True):
            m.layers[0].trainable = trainable
            m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        results.append([np.asarray(w) for w in m.get_weights()])
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", ["adamw", "adamw_schedule", "sgd_momentum", "rmsprop", "adam", "adamw_excluding"])
def test_weight_decay_trains_as_keras(which):
    """Keras's decoupled weight decay (AdamW, and weight_decay= on the others): each step the trained weights
    (biases and BatchNormalization's gamma and beta too) shrink by weight_decay·lr before the update — the same
    weights as Keras's after five steps, with a schedule's rate per step."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((20, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    keras_ref.utils.set_random_seed(2)
    results = []
    for lib in (keras_ref, gpucnn):
        o, L = lib.optimizers, lib.layers
        opt = {"adamw": lambda: o.AdamW(0.01, weight_decay=0.2),
               "adamw_schedule": lambda: o.AdamW(o.schedules.ExponentialDecay(0.05, 2, 0.5)),
               "sgd_momentum": lambda: o.SGD(0.1, momentum=0.9, weight_decay=0.3),
               "rmsprop": lambda: o.RMSprop(0.01, weight_decay=0.5),
               "adam": lambda: o.Adam(0.01, weight_decay=0.1),
               "adamw_excluding": lambda: o.AdamW(0.01, weight_decay=0.5)}[which]()
        if which == "adamw_excluding":  # biases and BatchNormalization's gamma and beta left out, a common choice
            opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        # (no bias before BatchNormalization: its gradient is zero up to rounding, which Adam turns into ±lr steps)
        m = lib.Sequential([lib.Input((6, 6, 2)), L.Conv2D(3, 3, use_bias=False), L.BatchNormalization(),
                            L.Activation("relu"), L.Flatten(), L.Dense(3, activation="softmax")])
        if results:
            m.set_weights(start)
        start = [np.asarray(w) for w in m.get_weights()]
        m.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        m.fit(x, y, batch_size=4, shuffle=False, verbose=0)
        results.append([np.asarray(w) for w in m.get_weights()])
    for got, want in zip(results[1], results[0]):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("metric", ["accuracy", "binary_accuracy"])
def test_accuracy_of_a_multi_label_model_is_kerass(metric):
    """Several sigmoid outputs under a binary cross-entropy: Keras's "accuracy" is categorical (arg-max), its
    "binary_accuracy" per output; fit's and evaluate's numbers as Keras's."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((24, 4)).astype(np.float32)
    y = (rng.random((24, 3)) < 0.4).astype(np.float32)
    got = []
    for lib in (keras_ref, gpucnn):
        m = lib.Sequential([lib.Input((4,)), lib.layers.Dense(3, activation="sigmoid", name="d")])
        if got:
            m.set_weights(start)
        start = [np.asarray(w) for w in m.get_weights()]
        m.compile(optimizer=lib.optimizers.SGD(0.1), loss="binary_crossentropy", metrics=[metric])
        h = m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        got.append((h.history[metric][0], m.evaluate(x, y, verbose=0, return_dict=True)[metric]))
    np.testing.assert_allclose(got[1], got[0], rtol=1e-6)


def test_dense_on_images_applies_over_the_last_axis_as_keras():
    """Dense after a Conv2D without Flatten (and on (N, T, F) inputs): Keras's per-position Dense, its shapes,
    parameter counts, predictions and weights after a step."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((8, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 2, 8)
    results = []
    for lib in (keras_ref, gpucnn):
        L = lib.layers
        inp = lib.Input((6, 6, 2))
        h = L.Dense(3, activation="relu", name="per_pixel")(L.Conv2D(4, 3, name="c")(inp))
        m = lib.Model(inp, L.Dense(2, activation="softmax", name="out")(L.Flatten()(h)))
        if results:
            m.set_weights(start)
        start = [np.asarray(w) for w in m.get_weights()]
        m.compile(optimizer=lib.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        before = np.asarray(m.predict(x, verbose=0))
        m.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        results.append((m.count_params(), tuple(m.get_layer("per_pixel").output.shape), before,
                        [np.asarray(w) for w in m.get_weights()]))
    assert results[1][:2] == results[0][:2] == (results[0][0], (None, 4, 4, 3))
    np.testing.assert_allclose(results[1][2], results[0][2], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[1][3], results[0][3]):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_batch_normalization_called_with_training_true_is_kerass_in_direct_calls_and_predict():
    """BatchNormalization()(x, training=True) in a functional model: model(x) normalizes with the batch's statistics
    and moves the moving ones, predict uses the moving ones (its training=False wins), as Keras 3."""
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((6, 5, 5, 2)) + 2).astype(np.float32)
    results = []
    for lib in (keras_ref, gpucnn):
        inp = lib.Input((5, 5, 2))
        bn = lib.layers.BatchNormalization(momentum=0.5)
        m = lib.Model(inp, bn(lib.layers.Conv2D(3, 3, use_bias=False, name="c")(inp), training=True))
        if results:
            m.get_layer("c").set_weights(kernel)
        kernel = m.get_layer("c").get_weights()
        direct = lib.ops.convert_to_numpy(m(z))
        results.append((direct, [np.asarray(w) for w in bn.get_weights()], np.asarray(m.predict(z, verbose=0))))
    for got, want in zip(results[1], results[0]):
        for g, w in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want]):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"expand_nested": True}, {"expand_nested": True, "show_trainable": True},
                                    {"positions": [0.4, 0.7, 0.85, 1.0]}, {"layer_range": ["pre", "deep2"]},
                                    {"layer_range": ["stem", "b.*"]}, {"positions": [0.5, 0.8, 1.0]}], ids=str)
def test_the_summarys_other_arguments_are_kerass(kwargs, monkeypatch):
    """expand_nested (a nested Sequential and a nested functional model, one inside the other), positions and
    layer_range draw Keras's table."""
    monkeypatch.setenv("COLUMNS", "120")

    def models_of(lib):
        L = lib.layers
        made = dict(branchy_graphs(lib))
        aug = lib.Sequential([L.RandomFlip("horizontal"), L.Rescaling(1 / 255)], name="augment")
        inner_in = lib.Input(shape=(8, 8, 3))
        block = lib.Model(inner_in, L.Conv2D(4, 3, name="block_conv")(aug(inner_in)), name="block")
        inputs = lib.Input(shape=(8, 8, 3))
        made["nested twice"] = lib.Model(inputs, L.Dense(2, name="head")(L.Flatten(name="flat")(block(inputs))),
                                         name="nested_twice")
        made["chain"] = lib.Sequential([lib.Input((8, 8, 3)), aug, L.Conv2D(2, 3, name="conv"),
                                        L.Flatten(name="flat"), L.Dense(2, name="dense")], name="chain")
        return made

    keras_ref.utils.clear_session()
    gpucnn.utils.clear_session()
    refs, ours = models_of(keras_ref), models_of(gpucnn)
    compared = 0
    for name, ref in refs.items():
        names = [layer.name for layer in ref.layers]
        wanted = kwargs.get("layer_range")
        if wanted and not all(any(__import__("re").match(p, n) for n in names) for p in wanted):
            continue
        positions = kwargs.get("positions")
        if positions and len(positions) != (3 if ours[name].graph.is_chain() else 4):
            continue
        assert summary_lines(ours[name], **kwargs) == summary_lines(ref, **kwargs), name
        compared += 1
    assert compared


@pytest.mark.parametrize("which", ["rmsprop", "rmsprop_momentum_centered", "adam", "sgd", "sgd_momentum",
                                   "adam_schedule", "rmsprop_function", "adamw"])
def test_the_summary_after_training_counts_the_optimizers_params_as_keras(which, monkeypatch):
    """Once the optimizer has its state (after the first step), Keras's summary adds "Optimizer params" (its state
    buffers over the trained weights, the step count, the learning rate unless a schedule or function gives it)
    and counts them in the total; before, not."""
    monkeypatch.setenv("COLUMNS", "100")

    def optimizer(lib):
        o = lib.optimizers
        return {"rmsprop": lambda: o.RMSprop(),
                "rmsprop_momentum_centered": lambda: o.RMSprop(momentum=0.9, centered=True),
                "adam": lambda: o.Adam(), "sgd": lambda: o.SGD(), "sgd_momentum": lambda: o.SGD(momentum=0.9),
                "adam_schedule": lambda: o.Adam(learning_rate=o.schedules.ExponentialDecay(0.1, 10, 0.9)),
                "rmsprop_function": lambda: o.RMSprop(learning_rate=lambda: 0.01),
                "adamw": lambda: o.AdamW(weight_decay=0.1)}[which]()

    texts = []
    for lib in (keras_ref, gpucnn):
        lib.utils.clear_session()
        m = lib.Sequential([lib.Input((4,)), lib.layers.Dense(3), lib.layers.BatchNormalization(),
                            lib.layers.Dense(2, activation="softmax")], name="s")
        m.layers[0].trainable = False
        m.compile(optimizer(lib), "categorical_crossentropy")
        before = summary_lines(m)
        m.fit(np.zeros((4, 4), np.float32), np.eye(2, dtype=np.float32)[[0, 1, 0, 1]], verbose=0)
        after = summary_lines(m)
        m.layers[-1].trainable = False  # frozen after training: the optimizer still holds its state, as Keras counts
        m.fit(np.zeros((4, 4), np.float32), np.eye(2, dtype=np.float32)[[0, 1, 0, 1]], verbose=0)
        texts.append(before + after + summary_lines(m))
    assert texts[1] == texts[0]


def test_history_and_evaluate_dicts_list_their_names_as_keras():
    """Keras 3 orders its logs by name (history.history's keys, evaluate(return_dict=True)); evaluate's list is
    [loss, metrics...]."""
    got = {}
    for lib in (keras_ref, gpucnn):
        m = lib.Sequential([lib.Input((4,)), lib.layers.Dense(3, activation="softmax")])
        m.compile("rmsprop", "sparse_categorical_crossentropy", metrics=["acc"])
        x, y = np.zeros((8, 4), np.float32), np.zeros(8, np.int64)
        history = m.fit(x, y, validation_split=0.25, verbose=0)
        got[lib] = list(history.history), list(m.evaluate(x, y, return_dict=True, verbose=0))
    assert got[gpucnn] == got[keras_ref]


def test_default_model_names_follow_keras_when_sequential_models_are_built():
    """Keras's Sequential makes a Functional inside it at each (re)build, spending a default model name: the book's
    augmentation block nested in a functional model makes that model "functional_1" in its summary."""
    def scenarios(lib):
        L, names = lib.layers, []
        lib.utils.clear_session()
        aug = lib.Sequential([L.RandomFlip("horizontal"), L.RandomRotation(0.1)])
        inputs = lib.Input((8, 8, 3))
        names.append(lib.Model(inputs, L.Flatten()(aug(inputs))).name)
        lib.utils.clear_session()
        s = lib.Sequential([lib.Input((4,)), L.Dense(2)])
        s.add(L.Dense(3))
        s.add(L.Dense(1))
        s.pop()
        inputs = lib.Input((4,))
        names.append(lib.Model(inputs, L.Dense(2)(inputs)).name)
        lib.utils.clear_session()
        lib.Sequential([L.Dense(2), L.Dense(3)]).build((None, 4))
        inputs = lib.Input((4,))
        names.append(lib.Model(inputs, L.Dense(2)(inputs)).name)
        return names

    assert scenarios(gpucnn) == scenarios(keras_ref)
