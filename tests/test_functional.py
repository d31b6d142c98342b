"""Keras's functional API on gpucnn (NumPy engine): ``import gpucnn as keras`` names, symbolic tensors, the
layer graph, merging layers, shared layers, nested models, the summary, saving, and clear errors."""
import numpy as np
import pytest

import gpucnn as keras
from gpucnn import layers, models, utils
from gpucnn.examples import book_convnet

pytestmark = pytest.mark.usefixtures("numpy_engine")


def residual_model(seed=0):
    """A residual Add, a Concatenate and a layer called twice."""
    utils.set_random_seed(seed)
    inputs = keras.Input(shape=(8, 8, 3))
    a = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    b = layers.Conv2D(3, 1)(a)
    c = layers.Add()([inputs, b])
    shared = layers.Conv2D(4, 1, activation="relu")
    d = layers.Concatenate()([shared(c), shared(inputs), a])
    e = layers.MaxPooling2D(2)(layers.Conv2D(5, 3, activation="relu")(d))
    outputs = layers.Dense(3, activation="softmax")(layers.Flatten()(e))
    return keras.Model(inputs, outputs)


def data(n=32, shape=(8, 8, 3), classes=3, seed=1):
    r = np.random.default_rng(seed)
    return r.standard_normal((n,) + shape).astype(np.float32), r.integers(0, classes, n)


def summary_lines(model):
    lines = []
    model.summary(print_fn=lines.append)
    return lines


# ===================================================================================== the namespace
def test_import_gpucnn_as_keras_is_enough():
    assert keras.Sequential is models.Sequential and keras.Model is models.Model and keras.Input is layers.Input
    for name in ("layers", "models", "optimizers", "losses", "metrics", "callbacks", "datasets", "utils"):
        assert hasattr(keras, name), name
    assert keras.models.load_model and keras.datasets.mnist.load_data and keras.utils.to_categorical
    assert keras.utils.set_random_seed and keras.callbacks.EarlyStopping and keras.optimizers.RMSprop
    assert keras.metrics.SparseCategoricalAccuracy().name == "sparse_categorical_accuracy"


@pytest.mark.parametrize("where, name, listed", [
    (keras, "applications", "Sequential"), (keras.ops, "conv", "expand_dims"), (layers, "Bidirectional", "Conv2D"), (keras.metrics, "AUC", "Accuracy"),
    (keras.optimizers, "Nadam", "Adam, AdamW, RMSprop, SGD"), (keras.callbacks, "TensorBoard", "ReduceLROnPlateau"),
    (keras.optimizers.schedules, "WarmUp", "CosineDecay, CosineDecayRestarts, ExponentialDecay, InverseTimeDecay"),
    (keras.activations, "mish", "gelu")])
def test_a_missing_keras_name_says_so_and_lists_what_exists(where, name, listed):
    with pytest.raises(AttributeError, match=f"no '{name}'.*It has|no '{name}'.*offers") as info:
        getattr(where, name)
    assert listed in str(info.value)


# ===================================================================================== symbolic tensors, the graph
def test_input_and_layer_calls_give_symbolic_tensors():
    inputs = keras.Input(shape=(28, 28, 1))
    assert inputs.shape == (None, 28, 28, 1) and inputs.dtype == "float32"
    conv = layers.Conv2D(32, 3, activation="relu")
    x = conv(inputs)
    assert x.shape == (None, 26, 26, 32) and conv.built and conv.count_params() == 320
    assert conv.input is inputs and conv.output is x
    with pytest.raises(TypeError, match="symbolic"):
        np.asarray(x)


def test_the_book_convnet_has_keras_summary_and_graph():
    model = book_convnet()
    assert model.count_params() == 104_202
    assert [type(layer).__name__ for layer in model.layers] == [
        "InputLayer", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "Flatten", "Dense"]
    assert model.inputs[0].shape == (None, 28, 28, 1) and model.output.shape == (None, 10)
    assert model.input is model.inputs[0] and model.get_layer("flatten") is model.layers[6]
    lines = summary_lines(model)
    assert lines[0] == 'Model: "functional"'
    rows = [tuple(c.strip() for c in line.strip("│").split("│")) for line in lines if line.startswith("│")]
    assert rows[0] == ("input_layer (InputLayer)", "(None, 28, 28, 1)", "0")
    assert rows[5] == ("conv2d_2 (Conv2D)", "(None, 3, 3, 128)", "73,856")
    assert lines[-3] == " Total params: 104,202 (407.04 KB)"


# Keras 3.15's own output for this graph (the same names given), on an 80-column console
KERAS_RESIDUAL_SUMMARY = """\
Model: "functional_1"
┏━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━┓
┃ Layer (type)        ┃ Output Shape      ┃    Param # ┃ Connected to      ┃
┡━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━┩
│ input_layer_1       │ (None, 8, 8, 3)   │          0 │ -                 │
│ (InputLayer)        │                   │            │                   │
├─────────────────────┼───────────────────┼────────────┼───────────────────┤
│ conv2d_3 (Conv2D)   │ (None, 8, 8, 4)   │        112 │ input_layer_1[0]… │
├─────────────────────┼───────────────────┼────────────┼───────────────────┤
│ conv2d_4 (Conv2D)   │ (None, 8, 8, 3)   │         15 │ conv2d_3[0][0]    │
├─────────────────────┼───────────────────┼────────────┼───────────────────┤
│ add (Add)           │ (None, 8, 8, 3)   │          0 │ input_layer_1[0]… │
│                     │                   │            │ conv2d_4[0][0]    │
├─────────────────────┼───────────────────┼────────────┼───────────────────┤
│ concatenate         │ (None, 8, 8, 7)   │          0 │ add[0][0],        │
│ (Concatenate)       │                   │            │ conv2d_3[0][0]    │
├─────────────────────┼───────────────────┼────────────┼───────────────────┤
│ global_average_poo… │ (None, 7)         │          0 │ concatenate[0][0] │
│ (GlobalAveragePool… │                   │            │                   │
├─────────────────────┼───────────────────┼────────────┼───────────────────┤
│ dense_1 (Dense)     │ (None, 2)         │         16 │ global_average_p… │
└─────────────────────┴───────────────────┴────────────┴───────────────────┘
 Total params: 143 (572.00 B)
 Trainable params: 143 (572.00 B)
 Non-trainable params: 0 (0.00 B)"""


def test_a_branching_graph_has_keras_connected_to_column(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    i = keras.Input(shape=(8, 8, 3), name="input_layer_1")
    a = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv2d_3")(i)
    b = layers.Conv2D(3, 1, name="conv2d_4")(a)
    c = layers.Add()([i, b])
    d = layers.Concatenate()([c, a])
    e = layers.GlobalAveragePooling2D()(d)
    m = keras.Model(i, [layers.Dense(2, activation="softmax", name="dense_1")(e), e], name="functional_1")
    assert "\n".join(summary_lines(m)) == KERAS_RESIDUAL_SUMMARY


def test_a_wide_terminal_widens_the_table_as_keras_does(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    lines = summary_lines(book_convnet())
    assert len(lines[1]) == 88  # min(88, columns - 4) for a chain
    assert len(set(len(line) for line in lines if line[0] in "┏┃┡│├└")) == 1


def test_a_nested_sequential_is_one_row_and_trains_inside():
    aug = keras.Sequential([layers.Flatten()], name="data_augmentation")
    inputs = keras.Input((4, 4, 1))
    outputs = layers.Dense(3, activation="softmax")(layers.Dense(5, activation="relu")(aug(inputs)))
    m = keras.Model(inputs, outputs)
    rows = [line for line in summary_lines(m) if line.startswith("│")]
    assert "data_augmentation (Sequential)" in rows[1] and "(None, 16)" in rows[1]
    block = keras.Sequential([layers.Dense(4, activation="relu", input_shape=(16,))], name="block")
    m2 = keras.Model(inputs, layers.Dense(3, activation="softmax")(block(layers.Flatten()(inputs))))
    m2.compile("sgd", "sparse_categorical_crossentropy")
    before = block.get_weights()[0].copy()
    x, y = data(16, (4, 4, 1))
    m2.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(before, block.get_weights()[0])  # the nested model's layer trained


def test_the_feature_map_idiom_of_the_book():
    model = book_convnet()
    x, _ = data(3, (28, 28, 1))
    features = keras.Model(inputs=model.inputs, outputs=[layer.output for layer in model.layers[1:8]])
    maps = features.predict(x, verbose=0)
    assert [m.shape for m in maps] == [(3, 26, 26, 32), (3, 13, 13, 32), (3, 11, 11, 64), (3, 5, 5, 64),
                                       (3, 3, 3, 128), (3, 1152), (3, 10)]
    np.testing.assert_array_equal(maps[-1], model.predict(x, verbose=0))
    assert features.layers[1] is model.layers[1]  # views of the same weights


def test_a_nested_sequentials_input_and_output_are_its_first_call_in_the_outer_model():
    """Keras 3: the book's data_augmentation Sequential, called in a functional model, answers ``input`` and
    ``output`` with that call's tensors, so an activation model over ``model.layers[:3]`` builds (before, its own
    graph's tensors were returned and the activation model was refused for an input the user never made)."""
    for first in ([], [keras.Input((6, 6, 2))]):  # with and without an Input of its own
        aug = keras.Sequential(first + [layers.RandomFlip("horizontal")], name="data_augmentation")
        inputs = keras.Input((6, 6, 2))
        x = aug(inputs)
        y = layers.Rescaling(0.5)(x)
        model = keras.Model(inputs, layers.Dense(3)(layers.Flatten()(y)))
        assert aug.input is inputs and aug.output is x
        assert aug.inputs[0] is not inputs  # its own graph's, as in Keras
        acts = keras.Model(inputs=model.input, outputs=[layer.output for layer in model.layers[:3]])
        images = np.random.default_rng(0).random((2, 6, 6, 2), dtype=np.float32)
        got = acts.predict(images, verbose=0)
        np.testing.assert_array_equal(got[1], images)  # inference: no flip
        np.testing.assert_allclose(got[2], images * 0.5)
    standalone = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    assert standalone.input is standalone.inputs[0] and standalone.output is standalone.outputs[0]


def test_a_nested_model_called_twice_trains_as_its_layer_called_twice():
    """A nested model with weights called twice in the outer graph (and a layer called inside a nested model and
    outside it): each call's weight gradients are added, as for a layer called twice (fit failed with "'Sequential'
    object has no attribute 'grads'", and the inner layers' second call would have overwritten the first's)."""
    x, y = data(16, (6, 6, 2))

    def train(nested):
        utils.set_random_seed(3)
        conv, dense = layers.Conv2D(3, 3, padding="same"), layers.Dense(3, activation="softmax")
        inputs = keras.Input((6, 6, 2))
        if nested == "twice":
            sub = keras.Sequential([keras.Input((6, 6, 2)), conv])
            a, b = sub(inputs), sub(layers.Rescaling(0.5)(inputs))
        elif nested == "inside and out":
            inner = keras.Input((6, 6, 2))
            sub = keras.Model(inner, conv(inner))
            a, b = sub(inputs), conv(layers.Rescaling(0.5)(inputs))
        else:
            a, b = conv(inputs), conv(layers.Rescaling(0.5)(inputs))
        model = keras.Model(inputs, dense(layers.Flatten()(layers.Add()([a, b]))))
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return conv.get_weights() + dense.get_weights()

    flat = train("flat")
    for nested in ("twice", "inside and out"):
        for got, want in zip(train(nested), flat):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=nested)


def test_a_layer_held_by_a_nested_model_and_outside_it_is_refused_by_save_not_written_unloadable(tmp_path):
    """A config names each layer in one model: such a file loaded as two separate layers ("the file holds 4 weight
    arrays, the model has 6"), so nothing could read what was saved. Refused before writing; weights files work."""
    conv = layers.Conv2D(2, 3, padding="same")
    sub = keras.Sequential([keras.Input((6, 6, 2)), conv])
    inputs = keras.Input((6, 6, 2))
    model = keras.Model(inputs, layers.Dense(3, activation="softmax")(layers.Flatten()(sub(conv(inputs)))))
    for save in (lambda: model.save(tmp_path / "m.keras"), model.to_json, lambda: models.clone_model(model)):
        with pytest.raises(ValueError, match="layer 'conv2d.*' is held by model .* and by model .*save_weights"):
            save()
    assert not (tmp_path / "m.keras").exists()
    model.save_weights(tmp_path / "w.npz")
    model.load_weights(tmp_path / "w.npz")
    twice = keras.Model(inputs, sub(sub(inputs)))  # a nested model called twice holds its layers alone: saved
    twice.save(tmp_path / "t.keras")
    x, _ = data(2, (6, 6, 2))
    np.testing.assert_array_equal(models.load_model(tmp_path / "t.keras").predict(x, verbose=0),
                                  twice.predict(x, verbose=0))


def test_a_model_called_on_an_array_runs_it():
    model = book_convnet()
    x, _ = data(2, (28, 28, 1))
    np.testing.assert_allclose(np.asarray(model(x)), model.predict(x, verbose=0), rtol=1e-6)


# ===================================================================================== training
def test_functional_and_sequential_train_bit_for_bit_alike():
    """The same layers written both ways: equal outputs, losses and weights after two epochs (two processes)."""
    def stack():
        return [layers.Conv2D(8, 3, activation="relu"), layers.MaxPooling2D(2), layers.Conv2D(8, 3, activation="relu"),
                layers.Flatten(), layers.Dense(16, activation="relu"), layers.Dense(3, activation="softmax")]
    seq = keras.Sequential([keras.Input((12, 12, 1))] + stack())
    inputs = keras.Input((12, 12, 1))
    x = inputs
    for layer in stack():
        x = layer(x)
    fun = keras.Model(inputs, x)
    fun.set_weights(seq.get_weights())
    xs, ys = data(96, (12, 12, 1))
    histories = []
    for m in (seq, fun):
        m.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
        histories.append(m.fit(xs, ys, batch_size=48, epochs=2, shuffle=False, verbose=0).history)
    assert histories[0] == histories[1]
    for a, b in zip(seq.get_weights(), fun.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_layer_called_twice_gets_the_sum_of_both_calls_gradients():
    """One Dense on two branches trains as two separate Dense layers would if their gradients were added."""
    utils.set_random_seed(3)
    inputs = keras.Input((6,))
    shared = layers.Dense(4, activation="relu")
    merged = layers.Concatenate()([shared(inputs), shared(layers.Dense(6)(inputs))])
    m = keras.Model(inputs, layers.Dense(2, activation="softmax")(merged))
    m.compile("sgd", "sparse_categorical_crossentropy")
    x, y = data(8, (6,), classes=2)
    m._pack_weights()
    m._grads[...] = 0
    m._forward_backward(x, y, 1.0)
    got = [g.copy() for g in shared.grads]
    # the same graph with the shared layer's two calls made by two copies of it
    first, second = layers.Dense(4, activation="relu"), layers.Dense(4, activation="relu")
    first.build((6,)), second.build((6,))
    first.set_weights(shared.get_weights())
    second.set_weights(shared.get_weights())
    inner = m.get_layer(m.layers[2].name) if isinstance(m.layers[2], layers.Dense) and m.layers[2] is not shared \
        else next(l for l in m.layers if isinstance(l, layers.Dense) and l.input_shape == (6,) and l.units == 6)
    twin_merged = layers.Concatenate()([first(inputs), second(inner(inputs))])
    twin = keras.Model(inputs, m.layers[-1](twin_merged))
    twin.compile("sgd", "sparse_categorical_crossentropy")
    twin._pack_weights()
    twin._grads[...] = 0
    twin._forward_backward(x, y, 1.0)
    for g, a, b in zip(got, first.grads, second.grads):
        assert np.abs(g).max() > 0
        np.testing.assert_allclose(g, a + b, rtol=1e-5, atol=1e-7)


def test_shared_layers_train_in_every_model_that_holds_them():
    model = keras.Sequential([layers.Conv2D(4, 3, activation="relu", input_shape=(8, 8, 1)), layers.Flatten(),
                              layers.Dense(3, activation="softmax")])
    model.compile("rmsprop", "sparse_categorical_crossentropy")
    x, y = data(32, (8, 8, 1))
    model.fit(x, y, epochs=1, verbose=0)
    sub = keras.Sequential(model.layers[:2])  # shares the convolution
    sub_out = sub.predict(x[:4], verbose=0)
    kernel = model.layers[0].get_weights()[0]
    model.fit(x, y, epochs=1, verbose=0)
    assert np.abs(model.layers[0].get_weights()[0] - kernel).max() > 0  # it still trains in the original
    assert not np.array_equal(sub.predict(x[:4], verbose=0), sub_out)  # and the sub-model sees it at once
    head = keras.Sequential([model.layers[2]])
    head.build((None, 144))
    head.compile("sgd", "sparse_categorical_crossentropy")
    feats = sub.predict(x, verbose=0)
    dense = model.layers[2].get_weights()[0]
    head.fit(feats, y, epochs=1, verbose=0)  # trained through another model ...
    trained = model.layers[2].get_weights()[0]
    assert np.abs(trained - dense).max() > 0  # ... the original sees it
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)  # and the original trains on from those values
    assert np.abs(model.layers[2].get_weights()[0] - trained).max() > 0
    np.testing.assert_array_equal(model.layers[2].get_weights()[0], head.layers[0].get_weights()[0])


def test_multiple_outputs_predict_and_refuse_fit_clearly():
    inputs = keras.Input((5,))
    h = layers.Dense(4, activation="relu")(inputs)
    m = keras.Model(inputs, [layers.Dense(2, activation="softmax")(h), h])
    out = m.predict(np.ones((3, 5), np.float32), verbose=0)
    assert [o.shape for o in out] == [(3, 2), (3, 4)]
    m.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.raises(NotImplementedError, match="2 outputs"):
        m.fit(np.ones((3, 5), np.float32), np.zeros(3), verbose=0)


# ===================================================================================== saving
def test_a_functional_model_with_a_shared_layer_saves_and_resumes_bit_for_bit(tmp_path):
    x, y = data(48)
    model = residual_model()
    model.compile("rmsprop", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "m.gpucnn")
    model.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, verbose=0)
    loaded = keras.models.load_model(tmp_path / "m.gpucnn")
    assert [type(layer).__name__ for layer in loaded.layers] == [type(layer).__name__ for layer in model.layers]
    assert summary_lines(loaded)[1:] == summary_lines(model)[1:]
    shared = [layer for layer in loaded.layers if len(layer._inbound_nodes) == 2]
    assert len(shared) == 1 and shared[0].count_params() == 16  # one layer, two calls, one set of weights
    loaded.fit(x, y, batch_size=16, epochs=2, initial_epoch=1, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    again = keras.Model.from_config(model.get_config())
    assert again.count_params() == model.count_params() and len(again.layers) == len(model.layers)


# ===================================================================================== bad input
def test_bad_input_gets_clear_errors():
    inputs = keras.Input((8, 8, 3))
    with pytest.raises(TypeError, match="called on a builtins.str"):
        layers.Dense(2)("hello")
    with pytest.raises(ValueError, match=r"Add 'add.*same shape.*\(None, 8, 8, 3\), \(None, 6, 6, 2\)"):
        layers.Add()([inputs, layers.Conv2D(2, 3)(inputs)])
    with pytest.raises(ValueError, match="Concatenate.*axis 1.*match in every other dimension"):
        layers.Concatenate(axis=1)([inputs, layers.Conv2D(2, 3, padding="same")(inputs)])
    with pytest.raises(ValueError, match="axis=0 is not a non-batch axis"):
        layers.Concatenate(axis=0)([inputs, inputs])
    other = keras.Input((8, 8, 3))
    with pytest.raises(ValueError, match="depend on the input 'input_layer_1'.*not among its inputs"):
        keras.Model(inputs, layers.Add()([inputs, other]))
    with pytest.raises(ValueError, match="depend on the input 'input_layer_1'.*not among its inputs"):
        keras.Model(inputs, layers.Flatten()(other))  # outputs that do not come from the model's input
    with pytest.raises(ValueError, match="made by keras.Input"):
        keras.Model(layers.Flatten()(inputs), layers.Dense(2)(layers.Flatten()(inputs)))
    conv = layers.Conv2D(2, 3)
    conv(inputs)
    with pytest.raises(ValueError, match=r"built for inputs \(8, 8, 3\) and cannot take \(9, 9, 3\)"):
        conv(keras.Input((9, 9, 3)))
    with pytest.raises(ValueError, match=r"shape must be a tuple, e.g. shape=\(784,\)"):
        keras.Input(shape=784)
    with pytest.raises(ValueError, match="variable sizes"):
        keras.Input((None, None, 3))
    with pytest.raises(TypeError, match="merges several tensors: call it on a list"):
        layers.Add()(inputs)
    with pytest.raises(TypeError, match="Model needs inputs= and outputs="):
        keras.Model()


def test_build_without_the_batch_dimension_says_so():
    m = keras.Sequential([layers.Conv2D(2, 3), layers.Flatten(), layers.Dense(2)])
    with pytest.raises(ValueError, match=r"batch dimension first.*model.build\(\(None, 28, 28, 1\)\)"):
        m.build((28, 28, 1))
    m.build((None, 28, 28, 1))
    assert m.output_shape == (None, 2)


def test_a_dropout_added_after_training_trains_too():
    m = keras.Sequential([keras.Input((6,)), layers.Dense(5, activation="relu")])
    m.add(layers.Dense(3, activation="softmax"))
    m.compile("sgd", "sparse_categorical_crossentropy")
    x, y = data(16, (6,))
    m.fit(x, y, epochs=1, verbose=0)
    last = m.layers[-1]
    assert m.pop() is last  # (Keras returns the layer it removes)
    m.add(layers.Dropout(0.5))
    m.add(layers.Dense(3, activation="softmax"))
    m.compile("sgd", "sparse_categorical_crossentropy")
    assert np.isfinite(m.fit(x, y, epochs=1, verbose=0).history["loss"][0])


def test_layers_are_listed_in_keras_order_not_in_call_order():
    """Keras lists a functional model's layers (and so its weights) by depth from the inputs, ties in the order a
    depth-first walk from the outputs first reaches them; these orders are Keras 3's for the same graphs
    (tests/test_keras_oracle.py checks them against Keras where it is installed). The graph runs its nodes in an
    order made from its structure alone, so a model rebuilt from its config runs the same way."""
    inputs = layers.Input(shape=(8, 8, 3))
    stem = layers.Conv2D(4, 3, padding="same", name="stem")(inputs)
    short = layers.Conv2D(4, 1, name="short")(stem)
    main = layers.Conv2D(4, 3, padding="same", name="main2")(layers.Conv2D(4, 3, padding="same", name="main1")(stem))
    m = models.Model(inputs, layers.Add(name="add")([main, short]))
    assert [layer.name for layer in m.layers[1:]] == ["stem", "main1", "main2", "short", "add"]
    inputs = layers.Input(shape=(6, 6, 4))
    shared = layers.Conv2D(4, 3, padding="same", name="shared")
    a = shared(layers.Conv2D(4, 1, name="pre")(inputs))
    b = shared(layers.Conv2D(4, 1, name="deep2")(layers.Conv2D(4, 1, name="deep1")(a)))
    m2 = models.Model(inputs, layers.Concatenate(name="cat")([b, layers.Conv2D(4, 1, name="side")(inputs)]))
    assert [layer.name for layer in m2.layers[1:]] == ["pre", "shared", "deep1", "deep2", "side", "cat"]
    again = models.Model.from_config(m2.get_config())
    assert [n.layer.name for n in again.graph.nodes] == [n.layer.name for n in m2.graph.nodes]
    assert [layer.name for layer in again.layers] == [layer.name for layer in m2.layers]


def test_summary_takes_kerass_arguments():
    """summary(line_length, positions, print_fn, expand_nested, show_trainable, layer_range), Keras's order:
    show_trainable adds a "Trainable" column (Y / N / - without weights); positions moves the column edges;
    layer_range keeps the rows from one name to another; expand_nested adds a nested model's layers under it
    (tests/test_keras_oracle.py compares each with Keras's table)."""
    inputs = layers.Input(shape=(6, 6, 2))
    x = layers.Conv2D(3, 3, name="frozen")(inputs)
    m = models.Model(inputs, layers.Dense(2, name="head")(layers.Flatten(name="flat")(x)))
    m.get_layer("frozen").trainable = False
    lines = []
    m.summary(line_length=120, print_fn=lines.append, show_trainable=True)
    text = "\n".join(lines)
    assert "Trainable" in lines[2]
    rows = {name: next(line for line in lines if name in line) for name in ("frozen", "flat", "head")}
    assert rows["frozen"].rstrip("│ ").endswith("N") and rows["head"].rstrip("│ ").endswith("Y")
    assert rows["flat"].rstrip("│ ").endswith("-")
    plain = []
    m.summary(line_length=120, print_fn=plain.append)
    assert "Trainable" not in plain[2] and len(plain) == len(lines) and text != "\n".join(plain)
    moved = []
    m.summary(line_length=100, positions=[0.5, 0.7, 0.85, 1.0], print_fn=moved.append)
    assert moved[1].index("┳") == 50 and len(moved) == len(plain)
    ranged = []
    m.summary(line_length=120, print_fn=ranged.append, layer_range=["frozen", "fl.*"])
    assert len(ranged) == len(plain) - 4 and "frozen" in ranged[4] and "flat" in ranged[6]
    assert not any("head" in line or "input_layer" in line for line in ranged)
    with pytest.raises(ValueError, match="does not match the layer names"):
        m.summary(layer_range=["frozen", "nothing"])
    with pytest.raises(ValueError, match="two layer names"):
        m.summary(layer_range="frozen")
    outer_in = layers.Input(shape=(6, 6, 2))
    outer = models.Model(outer_in, layers.Dense(1, name="top")(m(outer_in)))
    nested = []
    outer.summary(line_length=120, print_fn=nested.append, expand_nested=True)
    names = [line.split("│")[1].strip().split(" (")[0] for line in nested if line.startswith("│") and "(" in line]
    assert "InputLayer" in nested[4] and names[1:] == [m.name, "└ " + m.layers[0].name, "└ frozen", "└ flat",
                                                        "└ head", "top"]


def test_the_summary_counts_the_optimizers_params_once_it_has_trained():
    """Keras's rule (tests/test_keras_oracle.py checks it against Keras): after the first step, "Optimizer params"
    = the state buffers over the trained weights + the step count + the learning rate (when a number), in the
    total too."""
    inputs = layers.Input(shape=(4,))
    m = models.Model(inputs, layers.Dense(2, activation="softmax")(layers.Dense(3, name="frozen")(inputs)))
    m.get_layer("frozen").trainable = False
    m.compile("adam", "categorical_crossentropy")
    before = []
    m.summary(line_length=100, print_fn=before.append)
    assert not any("Optimizer" in line for line in before) and " Total params: 23 (92.00 B)" in before
    m.fit(np.zeros((4, 4), np.float32), np.eye(2, dtype=np.float32)[[0, 1, 0, 1]], verbose=0)
    after = []
    m.summary(line_length=100, print_fn=after.append)
    trained = 3 * 2 + 2  # the second Dense: Adam keeps m and v for each of its 8 values
    assert f" Optimizer params: {2 * trained + 2} (72.00 B)" in after
    assert f" Total params: {23 + 2 * trained + 2} (164.00 B)" in after


def test_inference_shares_work_arrays_and_keeps_nothing_for_a_backward_pass():
    """predict and evaluate keep no layer's input or output after it has run, and the layers' work arrays are one
    per shape for the whole model (a large batch's predict held every layer's before); the predictions are those
    of each sample alone, and the same twice."""
    utils.set_random_seed(5)
    inputs = layers.Input(shape=(10, 10, 8))
    x = layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    y = layers.Conv2D(8, 3, padding="same", name="c2")(layers.ReLU()(layers.BatchNormalization()(x)))
    x = layers.Add()([x, layers.Conv2D(8, 3, padding="same", name="c3")(y)])
    m = models.Model(inputs, layers.Dense(3, activation="softmax")(layers.GlobalAveragePooling2D()(x)))
    data = np.random.default_rng(1).standard_normal((12, 10, 10, 8)).astype(np.float32)
    got = m.predict(data, batch_size=12, verbose=0)
    contexts = m._contexts(12, False)
    work = {id(contexts[n]["ops"]) for n in m.graph.nodes if "ops" in contexts[n]}
    assert len(work) == 1  # one work dict for every layer
    shared = next(contexts[n]["ops"] for n in m.graph.nodes if "ops" in contexts[n])
    chunks = [work for key, work in shared.items() if isinstance(key, tuple) and key[0] == "chunk"]
    assert len(chunks) == 1  # c1, c2, c3: one shape, one chunk size, one set of work arrays
    assert len([k for k in chunks[0] if isinstance(k, tuple) and k[0] == "cols_plain"]) == 1
    for node in m.graph.nodes:
        assert not {"x", "y"} & set(contexts[node]), node
    np.testing.assert_array_equal(m.predict(data, batch_size=12, verbose=0), got)
    alone = np.concatenate([m.predict(data[i:i + 1], verbose=0) for i in range(12)])
    np.testing.assert_allclose(got, alone, rtol=1e-6, atol=1e-7)


def test_a_users_conv2d_subclass_is_never_fused_past_its_own_forward():
    """Inference's Conv2D + BatchNormalization and training's Conv2D + 2x2 max-pool run as one engine op only for
    gpucnn's own Conv2D: a subclass's forward (here: doubling its output) must run."""
    class DoubledConv(layers.Conv2D):
        def forward(self, x, training, ctx):
            return super().forward(x, training, ctx) * 2.0

    inputs = layers.Input(shape=(6, 6, 8))
    conv = DoubledConv(8, 3, padding="same")
    bn = layers.BatchNormalization()
    m = models.Model(inputs, bn(conv(inputs)))
    assert all(len(step) == 1 for step in m.graph.steps(False))
    x = np.random.default_rng(0).standard_normal((4, 6, 6, 8)).astype(np.float32)
    want = bn.forward(np.array(conv.forward(x, False, {})), False, {})
    np.testing.assert_allclose(m.predict(x, verbose=0), want, rtol=1e-6, atol=1e-6)
    pooled = models.Model(inputs, layers.MaxPooling2D(2)(DoubledConv(4, 3)(inputs)))
    assert all(len(step) == 1 for step in pooled.graph.steps(True))


def test_a_batch_normalization_called_twice_trains_with_both_calls_gradients():
    """A shared BatchNormalization (called on two tensors): its gamma and beta gradients are the sums of its calls',
    as two separate layers with the same weights would have them; its moving statistics have no gradient."""
    def build(shared):
        utils.set_random_seed(4)
        inputs = layers.Input(shape=(5, 5, 4))
        conv = layers.Conv2D(4, 3, padding="same", name="conv")
        bn_a = layers.BatchNormalization(name="bn_a")
        bn_b = bn_a if shared else layers.BatchNormalization(name="bn_b")
        a = layers.ReLU()(bn_a(conv(inputs)))
        b = bn_b(layers.Conv2D(4, 3, padding="same", name="conv2")(a))
        m = models.Model(inputs, layers.Dense(3, activation="softmax", name="head")(layers.Flatten()(b)))
        m.compile("sgd", "sparse_categorical_crossentropy")
        return m

    tied, untied = build(True), build(False)
    gamma = np.random.default_rng(1).uniform(0.5, 2, 4).astype(np.float32)
    beta = np.random.default_rng(2).standard_normal(4).astype(np.float32)
    for m in (tied, untied):
        for name in ("bn_a", "bn_b") if m is untied else ("bn_a",):
            m.get_layer(name).set_weights([gamma, beta, np.zeros(4), np.ones(4)])
        for name in ("conv", "conv2", "head"):
            m.get_layer(name).set_weights(tied.get_layer(name).get_weights())
    x = np.random.default_rng(3).standard_normal((6, 5, 5, 4)).astype(np.float32)
    y = np.arange(6) % 3
    tied._forward_backward(x, y, 1.0)
    untied._forward_backward(x, y, 1.0)
    for i in range(2):  # gamma, beta
        np.testing.assert_allclose(tied.get_layer("bn_a").grads[i], untied.get_layer("bn_a").grads[i] +
                                   untied.get_layer("bn_b").grads[i], rtol=1e-5, atol=1e-6)
    tied.fit(x, y, batch_size=6, epochs=1, verbose=0)  # trains (it raised KeyError before)


def test_training_given_at_a_symbolic_call_holds_when_the_model_is_called_without_one(tmp_path):
    """Keras: ``layers.Dropout(0.5)(x, training=True)`` makes ``model(x)`` drop units at every call (Monte-Carlo
    dropout), and ``BatchNormalization()(x, training=True)`` normalizes with the batch's statistics and updates the
    moving ones; fit, evaluate and predict override it (predict is deterministic). It was dropped silently."""
    inp = keras.Input((4,))
    out = layers.Dense(3)(layers.Dropout(0.5)(layers.Dense(8)(inp), training=True))
    m = models.Model(inp, out)
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    assert not np.allclose(m(x), m(x))
    np.testing.assert_array_equal(m.predict(x, verbose=0), m.predict(x, verbose=0))
    cin = keras.Input((5, 5, 2))
    bn = layers.BatchNormalization()
    m2 = models.Model(cin, bn(layers.Conv2D(3, 3, use_bias=False)(cin), training=True))
    z = np.random.default_rng(1).standard_normal((4, 5, 5, 2)).astype(np.float32) + 3
    y = np.asarray(m2(z))
    np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)  # the batch's statistics, not the moving ones
    assert np.abs(bn.get_weights()[2]).max() > 0  # the moving mean moved
    m2.save(tmp_path / "m.gpucnn")
    again = models.load_model(tmp_path / "m.gpucnn")
    assert [n.training for layer in again.layers for n in layer._inbound_nodes] == [None, None, True]


@pytest.mark.parametrize("base_kind", ["functional", "sequential"])
def test_a_sequential_whose_first_layer_is_a_built_model_is_built_at_once(base_kind):
    """The transfer-learning idiom ``Sequential([base_model, head...])``: Keras builds the Sequential with the base
    model's input shape, so get_weights, count_params and summary work before fit (they raised "not built")."""
    if base_kind == "functional":
        inputs = keras.Input((8, 8, 3))
        base = keras.Model(inputs, layers.Conv2D(4, 3)(inputs), name="base")
    else:
        base = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3)], name="base")
    model = keras.Sequential([base, layers.GlobalAveragePooling2D(), layers.Dense(3, activation="softmax")])
    assert model.built and model.input_shape == (None, 8, 8, 3)
    assert model.count_params() == (3 * 3 * 3 * 4 + 4) + (4 * 3 + 3)
    assert [w.shape for w in model.get_weights()] == [(3, 3, 3, 4), (4,), (4, 3), (3,)]
    x = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    features = base.predict(x, verbose=0).mean(axis=(1, 2))
    want = model.layers[-1](features)
    np.testing.assert_allclose(model.predict(x, verbose=0), want, rtol=1e-5, atol=1e-6)


def test_weight_paths_are_kerass():
    """A layer a Sequential model builds has its weights' paths under the model's name, as in Keras
    (``sequential/dense/kernel``); a functional model's layers are built outside it (``dense/kernel``); a nested
    Sequential keeps its own."""
    s = keras.Sequential([keras.Input((4,)), layers.Dense(2)])
    assert [w.path for w in s.weights] == ["sequential/dense/kernel", "sequential/dense/bias"]
    late = keras.Sequential([layers.Dense(2)])
    late.build((None, 4))
    assert [w.path for w in late.weights] == ["sequential_1/dense_1/kernel", "sequential_1/dense_1/bias"]
    inputs = keras.Input((4,))
    functional = keras.Model(inputs, layers.Dense(2)(inputs))
    assert [w.path for w in functional.weights] == ["dense_2/kernel", "dense_2/bias"]
    inner = keras.Sequential([keras.Input((4,)), layers.Dense(2)], name="inner")
    outer = keras.Sequential([keras.Input((4,)), inner, layers.Dense(1)])
    assert [w.path for w in outer.weights] == ["inner/dense_3/kernel", "inner/dense_3/bias",
                                               "sequential_2/dense_4/kernel", "sequential_2/dense_4/bias"]
