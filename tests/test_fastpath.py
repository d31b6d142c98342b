"""The fast GPU training path (gpucnn/models/fastpath.py): which models it takes (CPU tests, run everywhere), and on
a GPU (marked ``gpu``, skipped with the backend's reason elsewhere) that it trains as the plain CUDA path and
the NumPy engine do, repeats bit for bit from a seed, allocates nothing while replaying its graphs, handles
the smaller last batch, reports divergence, and falls back with one notice.
"""
import numpy as np
import pytest

from gpucnn import backend, layers, losses, models, optimizers
from gpucnn.models import fastpath
from gpucnn.models.graph import Contexts
from gpucnn.utils import set_random_seed, to_categorical

_usable, _reason = backend.gpu_status()
needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not _usable, reason=f"no usable GPU: {_reason}")]


def _gpu(test):
    """Mark a test ``gpu`` and skip it, with the backend's reason, where no GPU is usable."""
    for mark in needs_gpu:
        test = mark(test)
    return test


@pytest.fixture
def cpu_engine():
    backend.set_engine("cpu")
    yield
    backend.set_engine("cpu")


@pytest.fixture
def gpu_engine():
    backend.set_engine("gpu")
    yield
    backend.set_engine("cpu")


def small_model(output="dense_softmax", optimizer="rmsprop", loss="categorical_crossentropy", dropout=0.0,
                pool="max"):
    """Conv (relu) + 2x2 max-pool (fused on the fast path), an unfused conv, Flatten, Dense, the output."""
    m = models.Sequential()
    m.add(layers.Conv2D(4, (3, 3), activation="relu", input_shape=(10, 10, 1)))
    m.add(layers.MaxPooling2D((2, 2)) if pool == "max" else layers.AveragePooling2D((2, 2)))
    m.add(layers.Conv2D(6, (2, 2), activation="relu", padding="same"))
    m.add(layers.Flatten())
    m.add(layers.Dense(8, activation="relu"))
    if dropout:
        m.add(layers.Dropout(dropout))
    if output == "dense_softmax":
        m.add(layers.Dense(5, activation="softmax"))
    elif output == "activation_softmax":
        m.add(layers.Dense(5))
        m.add(layers.Activation("softmax"))
    else:
        m.add(layers.Dense(5))
    m.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return m


def binary_logits_model(optimizer="rmsprop", label_smoothing=0.0):
    """keras.io's image-classification-from-scratch head: one linear unit under a binary cross-entropy from logits,
    its accuracy counted on the logit (Keras's BinaryAccuracy threshold 0.5 on the model's output)."""
    from gpucnn import metrics
    m = models.Sequential([layers.Input((10, 10, 1)), layers.Conv2D(3, 3, activation="relu"),
                           layers.GlobalAveragePooling2D(), layers.Dense(1)])
    m.compile(optimizer=optimizer, loss=losses.BinaryCrossentropy(from_logits=True, label_smoothing=label_smoothing),
              metrics=[metrics.BinaryAccuracy(name="acc")])
    return m


def seed_model():
    m = models.Sequential()
    m.add(layers.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1)))
    m.add(layers.MaxPooling2D((2, 2)))
    m.add(layers.Conv2D(64, (3, 3), activation="relu"))
    m.add(layers.MaxPooling2D((2, 2)))
    m.add(layers.Conv2D(64, (3, 3), activation="relu"))
    m.add(layers.Flatten())
    m.add(layers.Dense(64, activation="relu"))
    m.add(layers.Dense(10, activation="softmax"))
    m.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    return m


def residual_model(optimizer="rmsprop", loss="categorical_crossentropy", dropout=0.0):
    """A functional model with a residual Add, a Concatenate, a layer called twice and a fused conv + pool."""
    inputs = layers.Input(shape=(10, 10, 1))
    x = layers.Conv2D(4, 3, activation="relu", padding="same")(inputs)
    y = layers.Conv2D(4, 3, padding="same")(x)
    x = layers.Add()([x, y])
    shared = layers.Conv2D(4, 1, activation="relu")
    z = layers.Concatenate()([shared(x), shared(y), x])
    z = layers.MaxPooling2D(2)(layers.Conv2D(6, 3, activation="relu")(z))  # 8x8 -> 4x4, fused in training
    z = layers.Flatten()(z)
    if dropout:
        z = layers.Dropout(dropout)(z)
    outputs = layers.Dense(5, activation="softmax")(z)
    m = models.Model(inputs, outputs)
    m.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    return m


def deeper_model(optimizer="rmsprop", frozen=()):
    """A residual block of modern convnets: Conv2D → BatchNormalization → ReLU → SeparableConv2D →
    BatchNormalization, added to the convolution; then ZeroPadding2D → DepthwiseConv2D → LeakyReLU, global max and
    average pooling joined, Reshape, and a Softmax layer as the output. ``frozen``: layers made non-trainable.
    (The SeparableConv2D's bias feeds a BatchNormalization, so its gradient is zero up to rounding, which Adam
    would turn into full steps: RMSprop by default.)"""
    inputs = layers.Input(shape=(10, 10, 1))
    x = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    y = layers.ReLU()(layers.BatchNormalization(name="bn_1")(x))
    y = layers.SeparableConv2D(4, 3, padding="same", depth_multiplier=2, name="separable")(y)
    x = layers.Add()([x, layers.BatchNormalization(momentum=0.9, name="bn_2")(y)])
    x = layers.ZeroPadding2D(((1, 0), (0, 1)))(x)
    x = layers.LeakyReLU()(layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2, name="depthwise")(x))
    x = layers.Concatenate()([layers.GlobalMaxPooling2D()(x), layers.GlobalAveragePooling2D()(x)])
    x = layers.Reshape((-1,))(layers.Reshape((4, 4))(x))
    m = models.Model(inputs, layers.Softmax()(layers.Dense(5)(x)))
    for name in frozen:
        m.get_layer(name).trainable = False
    m.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=["accuracy"])
    return m


def small_data(n=40, kind="u8", sparse=False, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "u8":
        x = rng.integers(0, 256, size=(n, 10, 10, 1)).astype("float32") / 255
    else:
        x = rng.normal(size=(n, 10, 10, 1)).astype("float32")
    labels = rng.integers(0, 5, size=n)
    return x, (labels if sparse else to_categorical(labels, 5))


# ===================================================================================== CPU: what is taken
def test_the_seed_model_and_the_supported_layers_are_taken(cpu_engine):
    assert fastpath.unsupported_reason(seed_model()) is None
    for kwargs in ({}, {"output": "activation_softmax"}, {"dropout": 0.5}, {"pool": "avg"},
                   {"optimizer": "adam"}, {"optimizer": optimizers.SGD(0.1, momentum=0.9, nesterov=True)},
                   {"loss": "sparse_categorical_crossentropy"},
                   {"output": "linear", "loss": losses.SparseCategoricalCrossentropy(from_logits=True)},
                   {"output": "linear", "loss": losses.CategoricalCrossentropy(from_logits=True)}):
        assert fastpath.unsupported_reason(small_model(**kwargs)) is None, kwargs
    assert fastpath.unsupported_reason(binary_logits_model()) is None
    m = models.Sequential([layers.Conv2D(3, 3, input_shape=(8, 8, 2)), layers.GlobalAveragePooling2D(),
                           layers.Dense(4, activation="softmax")])
    m.compile(optimizer="sgd", loss="categorical_crossentropy")
    assert fastpath.unsupported_reason(m) is None
    m = models.Sequential([layers.Conv2D(3, 3, activation="softmax", input_shape=(5, 5, 1)), layers.Flatten(),
                           layers.Dense(3, activation="softmax")])  # any activation inside: the same step
    m.compile(optimizer="sgd", loss="categorical_crossentropy")
    assert fastpath.unsupported_reason(m) is None
    assert fastpath.unsupported_reason(residual_model()) is None  # Add, Concatenate, a shared layer
    assert fastpath.unsupported_reason(deeper_model()) is None  # BatchNormalization, separable blocks, Softmax


def test_models_it_cannot_take_are_refused_with_a_reason(cpu_engine):
    assert "softmax" in fastpath.unsupported_reason(small_model(output="linear"))

    class MyAdam(optimizers.Adam):
        pass

    assert "MyAdam" in fastpath.unsupported_reason(small_model(optimizer=MyAdam()))

    class Custom(layers.Flatten):
        pass

    m = models.Sequential([layers.Flatten(input_shape=(4, 4, 1)), Custom(), layers.Dense(3, activation="softmax")])
    m.compile(optimizer="sgd", loss="categorical_crossentropy")
    assert "Custom" in fastpath.unsupported_reason(m)

    m = models.Sequential([layers.Flatten(input_shape=(4, 4, 1)), layers.Dense(3, activation="softmax")])
    m.compile(optimizer="sgd", loss="categorical_crossentropy")
    m.layers[-1].__class__ = type("Dense", (layers.Dense,), {})  # a user's class of a built-in's name
    assert "not one of gpucnn's own layers" in fastpath.unsupported_reason(m)
    assert "no layers" in fastpath.unsupported_reason(models.Sequential())
    inputs = layers.Input((6,))
    two = models.Model(inputs, [layers.Dense(3, activation="softmax")(inputs), layers.Dense(2)(inputs)])
    two.compile(optimizer="sgd", loss="categorical_crossentropy")
    assert "2 outputs" in fastpath.unsupported_reason(two)
    multi = models.Sequential([layers.Input((6,)), layers.Dense(3, activation="sigmoid")])
    multi.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["accuracy"])  # Keras's: categorical
    assert "count categorical accuracy under a binary_crossentropy loss" in fastpath.unsupported_reason(multi)
    multi.compile(optimizer="sgd", loss="binary_crossentropy", metrics=["binary_accuracy"])
    assert fastpath.unsupported_reason(multi) is None
    smoothed = models.Sequential([layers.Input((6,)), layers.Dense(3, activation="softmax")])
    smoothed.compile(optimizer="sgd", loss=losses.CategoricalCrossentropy(label_smoothing=0.1))
    assert fastpath.unsupported_reason(smoothed) is None  # the step smooths the labels as the plain path does
    softmax_logits = small_model(loss=losses.CategoricalCrossentropy(from_logits=True))  # a softmax output
    assert "not a linear Dense or Activation (logits)" in fastpath.unsupported_reason(softmax_logits)
    frozen = small_model()
    frozen.trainable = False
    assert "no trainable weights" in fastpath.unsupported_reason(frozen)


def test_which_max_pools_run_inside_the_convolution():
    conv = layers.Conv2D(4, 3, activation="relu")
    assert layers.fusable_pool(conv, layers.MaxPooling2D((2, 2)))
    assert layers.fusable_pool(layers.Conv2D(4, 3), layers.MaxPooling2D(2, strides=2))
    assert not layers.fusable_pool(conv, layers.MaxPooling2D((3, 3)))
    assert not layers.fusable_pool(conv, layers.MaxPooling2D((2, 2), strides=1))
    assert not layers.fusable_pool(conv, layers.MaxPooling2D((2, 2), padding="same"))
    assert not layers.fusable_pool(conv, layers.AveragePooling2D((2, 2)))
    assert not layers.fusable_pool(conv, None)


def test_uint8_storage_is_used_exactly_when_it_reproduces_x():
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = u8.astype("float32") / 255
    np.testing.assert_array_equal(fastpath.as_uint8(x), u8)
    assert fastpath.as_uint8(u8.astype("float32") / 256) is None  # not /255
    assert fastpath.as_uint8(x * 2) is None                      # out of range
    y = x.copy()
    y[3, 3] = np.nextafter(y[3, 3], np.float32(1))
    assert fastpath.as_uint8(y) is None                          # one bit off
    z = x.copy()
    z[0, 0] = -0.0
    assert fastpath.as_uint8(z) is None                          # -0.0 would come back as +0.0


def test_plan_says_why_on_the_numpy_engine(cpu_engine):
    m = small_model()
    x, y = small_data()
    assert "not the GPU" in fastpath.plan(m, 16, x, y)


# ===================================================================================== GPU
def _fit_weights(engine, weights, x, y, monkeypatch, fast=True, epochs=1, batch_size=16, shuffle=False,
                 make=None, **model_kwargs):
    """Weights and history after fitting small_model (or ``make()``) from ``weights`` on ``engine``."""
    backend.set_engine(engine)
    monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
    m = small_model(**model_kwargs) if make is None else make()
    m.set_weights(weights)
    h = m.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=shuffle, verbose=0)
    return m.get_weights(), h.history


@_gpu
@pytest.mark.parametrize("optimizer", ["rmsprop", "adam", "sgd_momentum"])
@pytest.mark.parametrize("kind, sparse, output", [("u8", False, "dense_softmax"), ("normal", True, "dense_softmax"),
                                                  ("u8", True, "activation_softmax")])
def test_fast_path_trains_as_the_plain_cuda_path_and_numpy(optimizer, kind, sparse, output, monkeypatch,
                                                           gpu_engine):
    opt = {"rmsprop": lambda: "rmsprop", "adam": lambda: "adam",
           "sgd_momentum": lambda: optimizers.SGD(0.05, momentum=0.9)}[optimizer]
    loss = "sparse_categorical_crossentropy" if sparse else "categorical_crossentropy"
    x, y = small_data(40, kind, sparse)  # batch 16: two full steps and a last one of 8
    backend.set_engine("cpu")
    start = small_model(output=output, loss=loss, optimizer=opt()).get_weights()
    results = {}
    for name, engine, fast in (("numpy", "cpu", False), ("plain", "gpu", False), ("fast", "gpu", True)):
        w, hist = _fit_weights(engine, start, x, y, monkeypatch, fast=fast, epochs=2, output=output,
                               loss=loss, optimizer=opt())
        results[name] = (w, hist)
    for name in ("plain", "numpy"):
        for got, want in zip(results["fast"][0], results[name][0]):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(results["fast"][1]["loss"], results[name][1]["loss"], rtol=1e-5)
        assert results["fast"][1]["accuracy"] == results[name][1]["accuracy"]


@_gpu
@pytest.mark.parametrize("head", ["sparse_logits", "binary_logits", "onehot_logits_smoothed", "binary_smoothed"])
def test_fast_path_trains_a_from_logits_loss_as_the_plain_cuda_path_and_numpy(head, monkeypatch, gpu_engine):
    """A linear output under a from_logits loss (keras.io's image-classification example's BinaryCrossentropy(
    from_logits=True) head; a sparse categorical one): the captured step computes the loss, its gradient and the
    accuracy from the logits as the plain path does (which it used to refuse, so such models never took it)."""
    if head == "sparse_logits":
        def make():
            return small_model(output="linear", loss=losses.SparseCategoricalCrossentropy(from_logits=True),
                               optimizer=optimizers.SGD(0.05, momentum=0.9))
        x, y = small_data(40, "normal", sparse=True)
    elif head == "onehot_logits_smoothed":  # label smoothing, one-hot labels, from logits (keras.io's later examples)
        def make():
            return small_model(output="linear", optimizer="adam",
                               loss=losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1))
        x, y = small_data(40, "normal")
    else:
        def make():
            return binary_logits_model(optimizer="adam", label_smoothing=0.2 if head == "binary_smoothed" else 0.0)
        x, labels = small_data(40, "normal", sparse=True)
        y = (labels % 2).astype(np.float32)
    backend.set_engine("cpu")
    start = make().get_weights()
    assert fastpath.unsupported_reason(make()) is None  # the fast run takes the fast path
    results = {name: _fit_weights(engine, start, x, y, monkeypatch, fast=fast, epochs=2, make=make)
               for name, engine, fast in (("numpy", "cpu", False), ("plain", "gpu", False), ("fast", "gpu", True))}
    backend.set_engine("cpu")
    for name in ("plain", "numpy"):
        for got, want in zip(results["fast"][0], results[name][0]):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
        assert results["fast"][1].keys() == results[name][1].keys()
        for key in results[name][1]:
            np.testing.assert_allclose(results["fast"][1][key], results[name][1][key], rtol=1e-5, err_msg=key)


@_gpu
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fast_path_trains_a_functional_residual_model_as_the_plain_cuda_path(dropout, monkeypatch, gpu_engine):
    """The captured step of a functional model (a residual Add, a Concatenate, a layer called twice, a fused conv
    + max-pool, Dropout) is the plain step: the same weights after two epochs (and NumPy's without dropout,
    whose masks come from another generator there)."""
    x, y = small_data(40)
    backend.set_engine("cpu")
    start = residual_model(dropout=dropout).get_weights()
    results = {}
    for name, engine, fast in (("numpy", "cpu", False), ("plain", "gpu", False), ("fast", "gpu", True)):
        backend.set_engine(engine)
        monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
        set_random_seed(5)
        m = residual_model(dropout=dropout)
        m.set_weights(start)
        if fast:
            assert isinstance(fastpath.plan(m, 16, x, y), fastpath.Trainer)
        h = m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results[name] = (m.get_weights(), h.history)
    for name in ("plain",) + (("numpy",) if not dropout else ()):
        for got, want in zip(results["fast"][0], results[name][0]):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(results["fast"][1]["loss"], results[name][1]["loss"], rtol=1e-5)


def binary_model():
    """Two classes with a sigmoid output and a binary cross-entropy (the book's cats-vs-dogs head)."""
    m = models.Sequential([layers.Conv2D(4, 3, activation="relu", input_shape=(10, 10, 1)), layers.MaxPooling2D(2),
                           layers.Flatten(), layers.Dense(6, activation="tanh"), layers.Dense(1, activation="sigmoid")])
    m.compile(optimizer="rmsprop", loss="binary_crossentropy", metrics=["accuracy"])
    return m


@_gpu
def test_fast_path_trains_a_sigmoid_binary_model_as_the_plain_cuda_path(monkeypatch, gpu_engine):
    x, labels = small_data(40, sparse=True)
    y = (labels % 2).astype(np.float32)
    backend.set_engine("cpu")
    start = binary_model().get_weights()
    results = {}
    for name, engine, fast in (("numpy", "cpu", False), ("plain", "gpu", False), ("fast", "gpu", True)):
        backend.set_engine(engine)
        monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
        m = binary_model()
        m.set_weights(start)
        if fast:
            assert isinstance(fastpath.plan(m, 16, x, y[:, None]), fastpath.Trainer)
        results[name] = (m.get_weights(), m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history)
    for name in ("plain", "numpy"):
        for got, want in zip(results["fast"][0], results[name][0]):
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=name)
        np.testing.assert_allclose(results["fast"][1]["loss"], results[name][1]["loss"], rtol=1e-5)
        assert results["fast"][1]["accuracy"] == results[name][1]["accuracy"]


@_gpu
def test_fast_path_trains_from_dataset_batches_as_the_plain_cuda_path(monkeypatch, gpu_engine):
    from gpucnn.data import PyDataset

    class Batches(PyDataset):
        def __init__(self, x, y):
            super().__init__()
            self.x, self.y = x, y

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return self.x[i * 16:(i + 1) * 16], self.y[i * 16:(i + 1) * 16]

    x, y = small_data(40)
    backend.set_engine("cpu")
    start = small_model(dropout=0.25).get_weights()
    results = {}
    for name, fast in (("plain", False), ("fast", True)):
        backend.set_engine("gpu")
        monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
        set_random_seed(4)
        m = small_model(dropout=0.25)
        m.set_weights(start)
        history = m.fit(Batches(x, y), epochs=2, shuffle=False, verbose=0).history
        results[name] = (history, m.get_weights())
    for got, want in zip(results["fast"][1], results["plain"][1]):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(results["fast"][0]["loss"], results["plain"][0]["loss"], rtol=1e-5)


@_gpu
def test_the_fast_path_is_used_and_has_a_last_batch_graph(gpu_engine):
    m = small_model()
    x, y = small_data(40)
    trainer = fastpath.plan(m, 16, x, y)
    assert isinstance(trainer, fastpath.Trainer), trainer
    assert trainer.x_u8 is not None and trainer.x_f32 is None
    assert (trainer.full_rows, trainer.last_rows, trainer.steps) == (16, 8, 3)
    trainer.begin_epoch(shuffle=True)
    assert sorted(trainer._graphs) == [8, 16]
    assert trainer.graph_for(2) is trainer._graphs[8][0] and trainer.graph_for(1) is trainer._graphs[16][0]
    exact = fastpath.plan(m, 20, x, y)  # 40 = 2 x 20: one graph
    exact.begin_epoch(shuffle=False)
    assert list(exact._graphs) == [20]
    whole = fastpath.plan(m, 64, x, y)  # a batch larger than the data: one step of 40
    assert (whole.full_rows, whole.last_rows, whole.steps) == (40, 40, 1)


@_gpu
def test_the_epoch_order_is_a_permutation_from_the_seed(gpu_engine):
    m = small_model()
    x, y = small_data(40)
    trainer = fastpath.plan(m, 16, x, y)
    # begin_epoch writes the order on the trainer's non-blocking stream, which a read on the default stream
    # would not wait for: read on that stream
    perm = lambda: trainer.perm.get(stream=trainer.stream)  # noqa: E731
    set_random_seed(3)
    trainer.begin_epoch(shuffle=True)
    first = perm()
    assert sorted(first.tolist()) == list(range(40)) and first.tolist() != list(range(40))
    set_random_seed(3)
    trainer.begin_epoch(shuffle=True)
    np.testing.assert_array_equal(perm(), first)
    trainer.begin_epoch(shuffle=False)
    np.testing.assert_array_equal(perm(), np.arange(40))


@_gpu
def test_replaying_the_graphs_allocates_nothing(gpu_engine):
    import cupy

    m = small_model(dropout=0.3, optimizer="adam")
    x, y = small_data(40)
    trainer = fastpath.plan(m, 16, x, y)
    trainer.begin_epoch(shuffle=True)
    cupy.cuda.Device().synchronize()
    pool = cupy.get_default_memory_pool()
    before = pool.used_bytes(), pool.total_bytes()
    for step in range(trainer.steps):
        trainer.graph_for(step).launch(trainer.stream)
    trainer.stream.synchronize()
    assert (pool.used_bytes(), pool.total_bytes()) == before
    assert int(trainer.step.get()[0]) == trainer.steps
    assert np.isfinite(trainer.loss_steps.get()).all()
    assert trainer.correct_steps.get().sum() <= 40


@_gpu
def test_graphs_are_replayed_only_over_the_buffers_they_were_captured_with(gpu_engine):
    # A CUDA graph holds raw pointers: after the optimizer state or the parameter buffer is replaced, the
    # old graphs would write freed memory. They are captured again instead.
    import cupy

    m = small_model(optimizer="adam")
    x, y = small_data(40)
    trainer = fastpath.plan(m, 16, x, y)
    trainer.begin_epoch(shuffle=False)
    first = dict(trainer._graphs)
    trainer.begin_epoch(shuffle=False)
    assert all(trainer._graphs[rows] is first[rows] for rows in first)  # the same buffers: reused
    m.optimizer.build(m._params.shape[0])  # new optimizer state arrays (the config is unchanged)
    trainer.begin_epoch(shuffle=False)
    second = dict(trainer._graphs)
    assert all(second[rows] is not first[rows] for rows in first)
    m._pack_weights()  # a new flat parameter buffer, the layers' weights views into it
    trainer.begin_epoch(shuffle=False)
    assert all(trainer._graphs[rows] is not second[rows] for rows in second)
    before = m._params.get(stream=trainer.stream)
    for step in range(trainer.steps):
        trainer.graph_for(step).launch(trainer.stream)
    trainer.stream.synchronize()
    after = cupy.asnumpy(m._params)
    assert np.isfinite(after).all() and not np.array_equal(after, before)  # the live buffer was trained


@_gpu
def test_a_failed_capture_leaves_the_process_usable(gpu_engine, monkeypatch):
    """Whatever fails inside a capture or at its end, the refusing allocator and the disabled garbage
    collector do not outlive it, the stream leaves capture mode, and the next epoch captures and trains."""
    import gc

    import cupy

    from gpucnn.engines import cuda_loader

    m = small_model()
    x, y = small_data(40)
    trainer = fastpath.plan(m, 16, x, y)
    allocator, launch, end_capture = cupy.cuda.get_allocator(), cuda_loader.launch, trainer.stream.end_capture

    class Injected(RuntimeError):
        pass

    def failing_launch(name, *args, **kwargs):  # a launch that fails inside the capture only
        if name == "step_advance" and trainer.stream.is_capturing():
            raise Injected("the launch failed")
        return launch(name, *args, **kwargs)

    def synchronising_launch(name, *args, **kwargs):  # synchronising a capturing stream: CUDA refuses it
        if name == "step_advance" and trainer.stream.is_capturing():  # and invalidates the capture
            trainer.stream.synchronize()
        return launch(name, *args, **kwargs)

    def failing_end_capture():  # e.g. the graph cannot be instantiated
        end_capture()
        raise Injected("end_capture failed")

    for what in ("launch", "synchronisation", "end_capture"):
        with monkeypatch.context() as patch:
            if what == "end_capture":
                patch.setattr(trainer.stream, "end_capture", failing_end_capture)
            else:
                patch.setattr(cuda_loader, "launch", failing_launch if what == "launch" else synchronising_launch)
            with pytest.raises(Exception) as info:
                trainer.begin_epoch(shuffle=False)
            assert isinstance(info.value, Injected) == (what != "synchronisation"), info.value
        assert cupy.cuda.get_allocator() == allocator, what
        assert gc.isenabled(), what
        assert not trainer.stream.is_capturing(), what
        assert cupy.zeros(3, np.float32).shape == (3,)  # later allocations work
    trainer.begin_epoch(shuffle=False)  # captures again, and the graphs train
    for step in range(trainer.steps):
        trainer.graph_for(step).launch(trainer.stream)
    trainer.stream.synchronize()
    assert int(trainer.step.get(stream=trainer.stream)[0]) == trainer.steps
    assert np.isfinite(trainer.loss_steps.get(stream=trainer.stream)).all()


@_gpu
def test_two_seeded_runs_are_bitwise_identical(gpu_engine):
    x, y = small_data(40)
    runs = []
    for _ in range(2):
        set_random_seed(7)
        m = small_model(dropout=0.25, optimizer="adam")
        h = m.fit(x, y, batch_size=16, epochs=2, shuffle=True, verbose=0)
        runs.append((m.get_weights(), h.history["loss"]))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)
    assert runs[0][1] == runs[1][1]


@_gpu
def test_dropout_masks_match_the_plain_cuda_path(gpu_engine, monkeypatch):
    # the same seeds are drawn in the same order (no shuffling), so the masks and the weights agree
    x, y = small_data(40)
    backend.set_engine("cpu")
    start = small_model(dropout=0.5).get_weights()
    out = []
    for fast in (False, True):
        set_random_seed(11)
        out.append(_fit_weights("gpu", start, x, y, monkeypatch, fast=fast, dropout=0.5)[0])
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@_gpu
def test_weights_set_by_a_callback_between_epochs_are_what_the_next_epoch_trains(gpu_engine, monkeypatch):
    # set_weights runs on the default stream; the next epoch's graphs on the trainer's non-blocking stream
    # must wait for it (Trainer.begin_epoch). Plain SGD holds no state, so epoch 2 from the start weights is
    # epoch 1 again: the same graphs from the same weights, the same bits.
    from gpucnn.callbacks import Callback

    monkeypatch.setenv("GPUCNN_FASTPATH", "1")
    x, y = small_data(40)
    backend.set_engine("cpu")
    start = small_model(optimizer="sgd").get_weights()
    backend.set_engine("gpu")

    class Reset(Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.model.set_weights(start)

    once = small_model(optimizer="sgd")
    once.set_weights(start)
    h1 = once.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    twice = small_model(optimizer="sgd")
    twice.set_weights(start)
    h2 = twice.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[Reset()])
    for a, b in zip(twice.get_weights(), once.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert h2.history["loss"] == h1.history["loss"] * 2


@_gpu
@pytest.mark.parametrize("frozen", [(), ("bn_1", "conv")], ids=["trainable", "frozen"])
def test_fast_path_trains_batch_normalization_and_separable_blocks_as_the_plain_cuda_path(frozen, monkeypatch,
                                                                                         gpu_engine):
    """The captured step updates BatchNormalization's moving statistics in place, and its eager first run (whose
    effect the capture undoes) leaves no trace: the same weights and moving statistics as the plain CUDA path and
    NumPy after two epochs (two graphs: batches of 16 and a last one of 8). Frozen layers stay bit-identical."""
    x, y = small_data(40, "normal")
    backend.set_engine("cpu")
    set_random_seed(2)
    start = deeper_model().get_weights()
    results = {}
    for name, engine, fast in (("numpy", "cpu", False), ("plain", "gpu", False), ("fast", "gpu", True)):
        backend.set_engine(engine)
        monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
        m = deeper_model(frozen=frozen)
        m.set_weights(start)
        if fast:
            assert isinstance(fastpath.plan(m, 16, x, y), fastpath.Trainer)
        h = m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results[name] = ([(layer.name, layer.get_weights()) for layer in m.layers], h.history)
    backend.set_engine("cpu")
    fast_layers, fast_history = results["fast"]
    for name in ("plain", "numpy"):
        layers_of, history = results[name]
        for (layer, got_weights), (_, want_weights) in zip(fast_layers, layers_of):
            for got, want in zip(got_weights, want_weights):  # moving statistics included
                np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=f"{name} {layer}")
        np.testing.assert_allclose(fast_history["loss"], history["loss"], rtol=1e-5)
    first = deeper_model()
    first.set_weights(start)
    fast_weights = dict(fast_layers)
    for name in ("conv", "bn_1", "bn_2"):
        moved = [not np.array_equal(a, b) for a, b in zip(fast_weights[name], first.get_layer(name).get_weights())]
        assert not any(moved) if name in frozen else all(moved), (name, moved)


@_gpu
def test_inference_with_batch_normalization_folded_into_convolutions_is_numpys(gpu_engine):
    """predict and evaluate on the GPU run a Conv2D and the BatchNormalization that alone reads it as one convolution
    (ops.batchnorm_fold, then conv2d_forward): NumPy's predictions and loss, and the plan says so."""
    x, y = small_data(12, "normal", sparse=True)
    results = {}
    for engine in ("cpu", "gpu"):
        backend.set_engine(engine)
        set_random_seed(4)
        inputs = layers.Input(shape=(10, 10, 1))
        h = layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
        h = layers.ReLU()(layers.BatchNormalization(name="bn_1")(h))
        h = layers.BatchNormalization(center=False, name="bn_2")(layers.Conv2D(5, 3, strides=2, use_bias=False)(h))
        m = models.Model(inputs, layers.Dense(5, activation="softmax")(layers.GlobalAveragePooling2D()(h)))
        m.compile("rmsprop", "sparse_categorical_crossentropy")
        rng = np.random.default_rng(6)
        for name in ("bn_1", "bn_2"):
            bn = m.get_layer(name)
            bn.set_weights([rng.uniform(0.5, 2, w.shape) for w in bn.get_weights()])
        assert sum(len(step) == 2 for step in m.graph.steps(False)) == 2
        results[engine] = m.predict(x, verbose=0), m.evaluate(x, y, verbose=0)
    np.testing.assert_allclose(results["gpu"][0], results["cpu"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results["gpu"][1], results["cpu"][1], rtol=1e-5)


def _plain_and_fast_cuda_fits(monkeypatch, make_optimizer, fit, check_fast=None):
    """Train ``small_model(optimizer=make_optimizer())`` from the same weights on the plain CUDA path and on the
    fast path (``fit(model)``; ``check_fast(model)`` after the fast one) and check they end with the same weights."""
    backend.set_engine("cpu")
    start = small_model().get_weights()
    results = []
    for fast in (False, True):
        backend.set_engine("gpu")
        monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
        m = small_model(optimizer=make_optimizer())
        m.set_weights(start)
        fit(m)
        results.append(m.get_weights())
        if fast and check_fast is not None:
            check_fast(m)
    backend.set_engine("cpu")
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@_gpu
@pytest.mark.parametrize("feed", ["arrays", "batches"])
def test_a_layer_frozen_by_a_callback_on_the_gpu_fast_path_is_the_plain_cuda_paths(feed, monkeypatch, gpu_engine):
    """A callback freezes the first convolution after the first epoch: the fast path lays the weights out in new
    buffers (copies on the default stream) and captures new graphs over them. The capture's warm-up on the
    non-blocking training stream read them before those copies were known to be done (the emulator's stream-order
    check: a race on a GPU, which could put stale weights back); the device is synchronised first now."""
    from gpucnn.callbacks import LambdaCallback
    x, y = small_data(40)

    def fit(m):
        kept = []

        def freeze(epoch, logs):
            if epoch == 0:
                m.layers[0].trainable = False
                kept.append(m.layers[0].get_weights())
        data = (x, y) if feed == "arrays" else (_Batches(x, y, 16), None)
        m.fit(*data, batch_size=16 if feed == "arrays" else None, epochs=2, shuffle=False, verbose=0,
              callbacks=[LambdaCallback(on_epoch_end=freeze)])
        for a, b in zip(kept[0], m.layers[0].get_weights()):
            np.testing.assert_array_equal(a, b)
    _plain_and_fast_cuda_fits(monkeypatch, lambda: optimizers.SGD(0.05, momentum=0.9), fit)


@_gpu
def test_batch_hooks_get_each_steps_logs_on_the_plain_cuda_path(monkeypatch, gpu_engine):
    """Off the fast path, the GPU engine's loop read the running loss every READ_EVERY steps (a read waits for the
    device): a callback's own batch hooks got {} (a LambdaCallback reading logs["loss"] failed). With such a hook
    it reads every step, as the NumPy engine (and Keras) do."""
    from gpucnn.callbacks import LambdaCallback
    monkeypatch.setenv("GPUCNN_FASTPATH", "0")
    x, y = small_data(40)
    seen = {}
    for engine in ("cpu", "gpu"):
        backend.set_engine(engine)
        set_random_seed(3)
        m = small_model(optimizer=optimizers.SGD(0.05))
        kept = seen.setdefault(engine, [])
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[LambdaCallback(on_train_batch_end=lambda batch, logs=None: kept.append(
                  (logs["loss"], logs["accuracy"])))])
    backend.set_engine("cpu")
    assert len(seen["gpu"]) == len(seen["cpu"]) == 5
    np.testing.assert_allclose(seen["gpu"], seen["cpu"], rtol=1e-5)


@_gpu
@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_fast_path_reads_a_schedules_rates_from_its_table(optimizer, monkeypatch, gpu_engine):
    """The captured optimizer launch reads each step's rate from the epoch's table (no capture per step): the
    table holds the schedule's formula, and training gives the plain CUDA path's weights."""
    from gpucnn.optimizers import schedules

    def make():
        decay = schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.5)
        return optimizers.SGD(decay, momentum=0.9) if optimizer == "sgd_momentum" else optimizers.Adam(decay)

    x, y = small_data(40)

    def check_table(m):
        trainer = fastpath.plan(m, 16, x, y)  # iterations 6: the table of the epoch from update 6 on
        trainer.begin_epoch(shuffle=False)
        trainer.stream.synchronize()  # the table is written on the training stream
        want = [0.05 * 0.5 ** (step / 2) for step in (6, 7, 8)]
        if optimizer == "adam":
            want = [lr * np.sqrt(1 - 0.999 ** (s + 1)) / (1 - 0.9 ** (s + 1)) for lr, s in zip(want, (6, 7, 8))]
        np.testing.assert_allclose(trainer.rates.get(), np.float32(want), rtol=1e-6)
    _plain_and_fast_cuda_fits(monkeypatch, make, lambda m: m.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                                                                 verbose=0), check_table)


@_gpu
def test_the_xception_like_model_trains_on_the_fast_path_and_the_plain_cuda_path(monkeypatch, gpu_engine, capsys):
    """The book's mini-Xception, small: with a softmax head it takes the fast path (the plain path's weights after
    an epoch); with its sigmoid head (a binary cross-entropy, which the captured step does not compute) it falls
    back to the plain CUDA path, with a notice, and trains there."""
    import gpucnn
    from book_models import xception_like

    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 12, 12, 3)).astype(np.float32)
    labels = rng.integers(0, 2, 12)
    results = []
    for fast in (False, True):
        monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
        set_random_seed(4)
        m = xception_like(gpucnn, shape=(12, 12, 3), sizes=(4, 8), head="softmax")
        m.compile("rmsprop", "sparse_categorical_crossentropy")
        if fast:
            assert isinstance(fastpath.plan(m, 8, x, labels), fastpath.Trainer)
        m.fit(x, labels, batch_size=8, shuffle=False, verbose=0)
        results.append(m.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    monkeypatch.setenv("GPUCNN_FASTPATH", "1")
    m = xception_like(gpucnn, shape=(12, 12, 3), sizes=(4, 8))
    m.compile("rmsprop", "binary_crossentropy", metrics=["accuracy"])
    h = m.fit(x, labels.astype(np.float32), batch_size=8, epochs=2, verbose=0)
    assert "not the fast path" in capsys.readouterr().err
    assert all(np.isfinite(h.history["loss"]))


@_gpu
def test_divergence_raises(gpu_engine):
    m = small_model(optimizer=optimizers.SGD(1e30))
    x, y = small_data(40, "normal")
    with pytest.raises(models.TrainingDivergedError):
        m.fit(x * 1e10, y, batch_size=8, epochs=3, verbose=0)


@_gpu
def test_an_unsupported_model_falls_back_with_one_notice(gpu_engine, capsys):
    # (not small_model(output="linear"): a cross-entropy on unnormalised outputs can diverge on the plain
    # engine, which raises TrainingDivergedError before the second fit)
    class MyFlatten(layers.Flatten):  # a user's layer: its step is not known to allocate nothing
        pass

    m = models.Sequential([layers.Conv2D(3, 3, activation="relu", input_shape=(10, 10, 1)), MyFlatten(),
                           layers.Dense(5, activation="softmax")])
    m.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    x, y = small_data(40)
    m.fit(x, y, batch_size=16, verbose=0)
    m.fit(x, y, batch_size=16, verbose=0)
    err = capsys.readouterr().err
    assert err.count("not the fast path") == 1 and "MyFlatten" in err


@_gpu
@pytest.mark.mnist
@pytest.mark.slow
def test_seed_model_one_epoch_on_an_mnist_subset_matches_numpy(monkeypatch):
    from gpucnn.datasets import mnist

    (x_train, y_train), _ = mnist.load_data()
    n = 4096
    x = (x_train[:n].astype("float32") / 255)[..., None]
    y = to_categorical(y_train[:n], 10)
    backend.set_engine("cpu")
    set_random_seed(0)
    start = seed_model().get_weights()
    hist = {}
    try:
        for engine in ("cpu", "gpu"):
            backend.set_engine(engine)
            set_random_seed(1)
            m = seed_model()
            m.set_weights(start)
            # no shuffling: the fast path's device order is not the NumPy generator's
            hist[engine] = m.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0).history
    finally:
        backend.set_engine("cpu")
    assert abs(hist["gpu"]["loss"][0] - hist["cpu"]["loss"][0]) < 1e-3
    assert abs(hist["gpu"]["accuracy"][0] - hist["cpu"]["accuracy"][0]) < 0.005


# ===================================================================================== CPU: the step's wiring
# The trainer run on the CPU: NumPy stand-ins for CuPy, for gpucnn.cuda (each new kernel of train_step.cu
# written again with ops_numpy) and for ops_cuda (ops_numpy plus ops_cuda's grid helpers), and
# each "graph" replaying the step's launches eagerly. This checks the fast path's plan — stages, buffers,
# counters, tables, metric reads — against the plain NumPy engine without a GPU; the kernels themselves are
# checked on the GPU above (and by the kernel emulator).
class _DeviceArray(np.ndarray):
    """A NumPy array with CuPy's ``get``/``set``."""

    def get(self, stream=None, out=None, blocking=True):
        if out is None:
            return np.array(self)
        out[...] = self
        return out

    def set(self, a):
        self[...] = a


def _dev(a):
    return np.ascontiguousarray(a).view(_DeviceArray)


class _Stream:
    def __init__(self, non_blocking=False):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        pass

    def record(self, event=None):
        return _Event() if event is None else event

    def wait_event(self, event):
        pass


_Stream.null = _Stream()


class _Event:
    done = True

    def __init__(self, disable_timing=False):
        pass

    def record(self, stream=None):
        pass


class _FakeCupy:
    class cuda:  # noqa: N801  (mirrors cupy.cuda)
        Stream, Event = _Stream, _Event

        class Device:  # noqa: N801
            def synchronize(self):
                pass

        @staticmethod
        def alloc_pinned_memory(nbytes):
            return bytearray(nbytes)

    asarray = staticmethod(lambda a: _dev(np.array(a)))
    zeros = staticmethod(lambda shape, dtype=np.float32: _dev(np.zeros(shape, dtype)))
    arange = staticmethod(lambda n, dtype=None: _dev(np.arange(n, dtype=dtype)))
    argsort = staticmethod(lambda a: _dev(np.argsort(a, kind="stable")))
    copyto = staticmethod(np.copyto)


def _mix64(z):
    z = np.asarray(z, np.uint64)
    with np.errstate(over="ignore"):
        z = z ^ (z >> np.uint64(30))
        z = z * np.uint64(0xbf58476d1ce4e5b9)
        z = z ^ (z >> np.uint64(27))
        z = z * np.uint64(0x94d049bb133111eb)
        return z ^ (z >> np.uint64(31))


def _kernel_stand_ins():
    from gpucnn.engines import numpy_ops as on

    def permutation_keys(keys, n, seed):
        with np.errstate(over="ignore"):
            bits = _mix64(_mix64(np.uint64(seed) + np.uint64(0x9e3779b97f4a7c15)) + np.arange(n, dtype=np.uint64))
        keys[...] = (bits & np.uint64(0xffffffff80000000)) | np.arange(n, dtype=np.uint64)

    def gather_batch(x_u8, x_f32, onehot, labels, perm, step, xb, onehot_b, labels_b, n, batch, rows, per, k):
        src = perm[step[0] * batch:step[0] * batch + rows]
        xb.reshape(rows, per)[...] = x_u8[src].astype(np.float32) / np.float32(255) if x_u8 is not None \
            else x_f32[src]
        if onehot is not None:
            onehot_b[...] = onehot[src]
        else:
            labels_b[...] = labels[src]

    def step_advance(step):
        step[0] += 1

    def binary_step(logits, y, dz, loss_steps, correct_steps, step, n, k, from_logits, keep, half):
        p = on.activation_forward(logits, "sigmoid")
        out = logits if from_logits else p  # what the model outputs, which the loss and the count read
        t = y * keep + half  # the smoothed targets, as the plain path's binary loss makes them
        loss_steps[step[0]] = on.binary_crossentropy_forward(out, t, from_logits).sum()
        correct_steps[step[0]] = on.count_binary_correct(out, y)
        dz[...] = on.sigmoid_binary_crossentropy_backward(p, t)

    def loss_step(sparse):
        def run(logits, y, dz, loss_steps, correct_steps, step, n, k, from_logits, keep, offset):
            t = y if sparse else y * keep + offset  # the targets, as the plain path's categorical loss makes them
            if from_logits:
                loss_steps[step[0]] = on.crossentropy_forward(logits, t, sparse, True).sum()
                correct_steps[step[0]] = on.count_correct(logits, y, sparse)
                dz[...] = on.crossentropy_backward(logits, t, sparse, True)
                return
            p = on.activation_forward(logits, "softmax")
            loss_steps[step[0]] = on.crossentropy_forward(p, t, sparse).sum()
            correct_steps[step[0]] = on.count_correct(p, y, sparse)
            dz[...] = on.softmax_crossentropy_backward(p, t, sparse)
        return run

    return {"permutation_keys": permutation_keys, "gather_batch": gather_batch, "step_advance": step_advance,
            "softmax_crossentropy_step_onehot": loss_step(False),
            "softmax_crossentropy_step_sparse": loss_step(True),
            "sigmoid_binary_crossentropy_step": binary_step}


def _fake_modules():
    import types

    from gpucnn.engines import cuda_loader as cuda, cuda_ops as ops_cuda, numpy_ops as ops_numpy

    kernels = _kernel_stand_ins()

    def launch(name, grid, block, args, shared_mem=0):
        params = cuda.signature(name)  # the real signature: the argument count must agree
        assert len(args) == len(params), (name, len(args), len(params))
        kernels[name](*args)

    fake_cuda = types.SimpleNamespace(launch=launch, kernel_constants=cuda.kernel_constants,
                                      empty=lambda shape, dtype=np.float32: _dev(np.zeros(shape, dtype)),
                                      DeviceOutOfMemoryError=cuda.DeviceOutOfMemoryError)
    ops = types.SimpleNamespace(**{k: getattr(ops_numpy, k) for k in dir(ops_numpy) if not k.startswith("__")})
    for helper in ("_THREADS", "_blocks"):
        setattr(ops, helper, getattr(ops_cuda, helper))
    return _FakeCupy, fake_cuda, ops


class _Replay:
    def __init__(self, program):
        self.program = program

    def launch(self, stream=None):
        for run in self.program:
            run()


class _CpuTrainer(fastpath.Trainer):
    def _capture(self, rows):
        contexts = Contexts(self.model.graph, step=self.values, skip_output_activation=True)
        return _Replay(self._program(rows, contexts)), contexts


class _CpuStreamTrainer(fastpath.StreamTrainer):
    _capture = _CpuTrainer._capture


@pytest.fixture
def cpu_fast_path(cpu_engine, monkeypatch):
    """``fit`` on the NumPy engine going through the fast path's trainer with NumPy stand-ins."""
    pytest.importorskip("cupy", reason="the grid helpers come from gpucnn.engines.cuda_ops, which imports CuPy")
    modules = _fake_modules()
    trainers = []

    def plan(model, batch_size, x, y):
        assert fastpath.unsupported_reason(model) is None
        trainers.append(_CpuTrainer(model, batch_size, x, y, _modules=modules))
        return trainers[-1]

    def plan_stream(model, batch_size, first):
        assert fastpath.unsupported_reason(model) is None
        trainers.append(_CpuStreamTrainer(model, max(batch_size, len(first[0])), first[0].shape[1:],
                                          _modules=modules))
        return trainers[-1]

    backend.ops()  # the NumPy ops stay chosen while fit is told the engine is CUDA
    monkeypatch.setattr(fastpath, "plan", plan)
    monkeypatch.setattr(fastpath, "plan_stream", plan_stream)
    monkeypatch.setattr(backend, "engine", lambda: "cuda")
    return trainers


@pytest.mark.parametrize("kwargs", [
    {},
    {"optimizer": "adam", "dropout": 0.4},
    {"optimizer": "sgd_momentum", "loss": "sparse_categorical_crossentropy", "output": "activation_softmax"},
    {"pool": "avg", "kind": "normal"},
    {"output": "linear", "loss": "from_logits", "kind": "normal"},
    {"loss": "smoothing", "optimizer": "adam"},
])
def test_the_fast_path_step_on_the_cpu_trains_as_the_numpy_engine(kwargs, cpu_fast_path, monkeypatch):
    kwargs = dict(kwargs)
    kind = kwargs.pop("kind", "u8")
    sparse = kwargs.get("loss") == "sparse_categorical_crossentropy"
    x, y = small_data(40, kind, sparse)
    results = []
    for fast in (False, True):
        set_random_seed(5)
        model_kwargs = dict(kwargs)
        if kwargs.get("optimizer") == "sgd_momentum":
            model_kwargs["optimizer"] = optimizers.SGD(0.05, momentum=0.9)  # a fresh state each run
        if kwargs.get("loss") == "from_logits":  # a linear output: the step's softmax and loss from the logits
            model_kwargs["loss"] = losses.CategoricalCrossentropy(from_logits=True)
        if kwargs.get("loss") == "smoothing":  # the step smooths the one-hot labels as the plain path's loss
            model_kwargs["loss"] = losses.CategoricalCrossentropy(label_smoothing=0.2)
        m = small_model(**model_kwargs)
        if not fast:
            monkeypatch.setattr(backend, "engine", lambda: "numpy")
        else:
            monkeypatch.setattr(backend, "engine", lambda: "cuda")
        h = m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append((m.get_weights(), h.history, m.optimizer.iterations))
    assert len(cpu_fast_path) == 1
    trainer = cpu_fast_path[0]
    assert (trainer.x_u8 is not None) == (kind == "u8")
    kinds = [tuple(type(n.layer).__name__ for n in step) for step in trainer.model.graph.steps(True)][:2]
    assert kinds == ([("Conv2D", "MaxPooling2D"), ("Conv2D",)] if "pool" not in kwargs
                     else [("Conv2D",), ("AveragePooling2D",)])
    (w_plain, h_plain, it_plain), (w_fast, h_fast, it_fast) = results
    assert it_plain == it_fast == 6
    for a, b in zip(w_fast, w_plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_fast["loss"], h_plain["loss"], rtol=1e-5)
    assert h_fast["accuracy"] == h_plain["accuracy"]


def _trained_on_both_engines(monkeypatch, train):
    """[(weights, history, iterations)] of ``train()`` — a function that builds a model, fits it and returns
    (model, history) — run from seed 5 on the NumPy engine, then on the CUDA engine (here the CPU fast path)."""
    results = []
    for engine in ("numpy", "cuda"):
        monkeypatch.setattr(backend, "engine", lambda engine=engine: engine)
        set_random_seed(5)
        m, h = train()
        results.append((m.get_weights(), h.history, m.optimizer.iterations))
    return results


def _assert_same_training(plain, fast):
    """The fast path's weights and losses are the plain step's, up to float32 rounding."""
    for a, b in zip(fast[0], plain[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast[1]["loss"], plain[1]["loss"], rtol=1e-5)


@pytest.mark.parametrize("feed", ["arrays", "batches"])
def test_weight_decay_on_the_cpu_fast_path_is_the_plain_steps(feed, cpu_fast_path, monkeypatch):
    """AdamW with a schedule: the captured step decays the weights by its row of the factors table (written with
    the rates, per epoch or per window), then updates them, as the plain step does."""
    from gpucnn.optimizers import schedules
    monkeypatch.setattr(fastpath, "READ_EVERY", 2)
    x, y = small_data(40)

    def train():
        m = small_model(optimizer=optimizers.AdamW(schedules.ExponentialDecay(0.05, 2, 0.5), weight_decay=0.4))
        data = (x, y) if feed == "arrays" else (_Batches(x, y, 16), None)
        return m, m.fit(*data, batch_size=16 if feed == "arrays" else None, epochs=2, shuffle=False, verbose=0)
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert len(cpu_fast_path) == 1 and plain[2] == fast[2] == 6
    _assert_same_training(plain, fast)


def test_the_cpu_fast_path_trains_this_sessions_layers_as_the_numpy_engine(cpu_fast_path, monkeypatch):
    """relu6 (a ReLU(6.0) layer and a Dense's activation), a Dense over the last axis of images and a global
    pooling with keepdims in the captured step: the plain step's weights and losses."""
    x, y = small_data(40, "normal")

    def train():
        m = models.Sequential([layers.Input((10, 10, 1)), layers.Conv2D(4, 3), layers.ReLU(6.0),
                               layers.Dense(3, activation="relu6"), layers.GlobalAveragePooling2D(keepdims=True),
                               layers.Flatten(), layers.Dense(5, activation="softmax")])
        m.compile("adam", "categorical_crossentropy", ["accuracy"])
        return m, m.fit(x * 4, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert len(cpu_fast_path) == 1
    _assert_same_training(plain, fast)


def test_the_cpu_fast_path_trains_a_functional_residual_model_as_the_numpy_engine(cpu_fast_path, monkeypatch):
    x, y = small_data(40)

    def train():
        m = residual_model(optimizer="adam", dropout=0.25)
        return m, m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert len(cpu_fast_path) == 1  # the second fit took the fast path
    _assert_same_training(plain, fast)


class _Batches:
    """A sequence of (x, y) batches, as a PyDataset is."""

    def __init__(self, x, y, size):
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, i):
        return self.x[i * self.size:(i + 1) * self.size], self.y[i * self.size:(i + 1) * self.size]


def test_the_cpu_fast_path_trains_from_host_batches_as_the_numpy_engine(cpu_fast_path, monkeypatch):
    """Batches of a dataset copied into the captured step's buffers, windows of READ_EVERY steps (a window cut in
    the middle of an epoch, a smaller last batch captured in the middle of a window), dropout seeds and Adam's
    rates refilled per window: the same weights and logs as the NumPy engine's plain step."""
    monkeypatch.setattr(fastpath, "READ_EVERY", 2)
    x, y = small_data(40)

    def train():
        m = small_model(optimizer="adam", dropout=0.3)
        return m, m.fit(_Batches(x, y, 16), epochs=2, shuffle=False, verbose=0)
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert isinstance(cpu_fast_path[-1], fastpath.StreamTrainer)
    assert sorted(cpu_fast_path[-1]._graphs) == [8, 16]
    assert plain[2] == fast[2] == 6
    _assert_same_training(plain, fast)
    assert fast[1]["accuracy"] == plain[1]["accuracy"]


def test_the_streamed_fast_path_asks_for_the_rates_of_the_steps_it_trains_only(cpu_fast_path, monkeypatch):
    """A window of streamed batches is as long as the steps left in the epoch: a schedule with no rate past the
    training's last step (CosineDecayRestarts with t_mul < 1) trains on the fast path as on the plain one (the window
    asked for READ_EVERY rates, past the end, and the schedule's error stopped the fit)."""
    from gpucnn.optimizers import schedules
    x, y = small_data(40)

    def train():
        m = small_model(optimizer=optimizers.SGD(schedules.CosineDecayRestarts(0.1, 3, t_mul=0.5)))
        return m, m.fit(_Batches(x, y, 8), epochs=1, shuffle=False, verbose=0)  # 5 steps of the schedule's 6
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert isinstance(cpu_fast_path[-1], fastpath.StreamTrainer) and plain[2] == fast[2] == 5
    _assert_same_training(plain, fast)


class _Undercounting:
    """An iterable dataset of (x, y) batches whose len() says 3 while it yields 5."""

    def __init__(self, x, y, size):
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return 3

    def __iter__(self):
        for i in range(0, len(self.x), self.size):
            yield self.x[i:i + self.size], self.y[i:i + self.size]


def test_the_streamed_fast_path_rates_steps_past_a_datasets_len(cpu_fast_path, monkeypatch):
    """A dataset that yields more batches than its len(): the steps past it read their own rates (the window was cut
    at len(), and those steps trained with a rate of 0 or a stale one)."""
    x, y = small_data(40)

    def train():
        m = small_model(optimizer=optimizers.SGD(0.1))
        return m, m.fit(_Undercounting(x, y, 8), epochs=2, shuffle=False, verbose=0)
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert plain[2] == fast[2] == 10
    _assert_same_training(plain, fast)


@pytest.mark.parametrize("feed", ["arrays", "batches"])
def test_the_cpu_fast_path_augments_as_the_numpy_engine(feed, cpu_fast_path, monkeypatch):
    """The random augmentation layers and Dropout, with and without their own seeds, in the captured step:
    values drawn for the epoch (arrays) or step by step as batches arrive (a smaller last batch, windows of
    READ_EVERY steps), in the plain path's order, so the same weights and logs as the NumPy engine's."""
    monkeypatch.setattr(fastpath, "READ_EVERY", 2)
    x, y = small_data(40)

    def train():
        m = models.Sequential([
            layers.Input(shape=(10, 10, 1)), layers.RandomFlip(seed=1), layers.RandomRotation(0.2),
            layers.RandomContrast(0.4, seed=3, value_range=(0, 1)), layers.Conv2D(4, (3, 3), activation="relu"),
            layers.Flatten(), layers.Dropout(0.3), layers.Dense(5, activation="softmax")])
        m.compile("adam", "categorical_crossentropy", ["accuracy"])
        data = (x, y) if feed == "arrays" else (_Batches(x, y, 16), None)
        return m, m.fit(*data, batch_size=16 if feed == "arrays" else None, epochs=2, shuffle=False, verbose=0)
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert len(cpu_fast_path) == 1
    _assert_same_training(plain, fast)


def test_the_cpu_fast_path_trains_batch_normalization_blocks_as_the_numpy_engine(cpu_fast_path, monkeypatch):
    x, y = small_data(40, "normal")

    def train():
        m = deeper_model(frozen=("bn_2",))
        return m, m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert len(cpu_fast_path) == 1
    _assert_same_training(plain, fast)


@pytest.mark.parametrize("hook", ["on_epoch_end", "on_train_batch_end"])
@pytest.mark.parametrize("feed", ["arrays", "batches"])
def test_a_layer_frozen_by_a_callback_stays_frozen_on_the_cpu_fast_path(feed, hook, cpu_fast_path, monkeypatch):
    """A callback freezes the first convolution after the first epoch (or the first step): the fast path lays the
    buffers out again and captures new graphs, so the later steps leave the layer as it was then (no stale
    gradient applied), as the NumPy engine's plain step does."""
    from gpucnn.callbacks import LambdaCallback
    x, y = small_data(40)
    kept = []

    def train():
        m = small_model(optimizer=optimizers.SGD(0.05, momentum=0.9))

        def freeze(index, logs):
            if index == 0:
                m.layers[0].trainable = False
                kept.append([w.copy() for w in m.layers[0].get_weights()])
        data = (x, y) if feed == "arrays" else (_Batches(x, y, 16), None)
        return m, m.fit(*data, batch_size=16 if feed == "arrays" else None, epochs=2, shuffle=False, verbose=0,
                        callbacks=[LambdaCallback(**{hook: freeze})])
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert len(cpu_fast_path) == 1
    for before, after in ((kept[0], plain[0]), (kept[len(kept) // 2], fast[0])):  # each run's first freeze
        for a, b in zip(before, after[:2]):
            np.testing.assert_array_equal(a, b)
    _assert_same_training(plain, fast)


@pytest.mark.parametrize("feed", ["arrays", "batches"])
def test_a_rate_set_in_a_batch_hook_applies_at_that_step_on_the_cpu_fast_path(feed, cpu_fast_path, monkeypatch):
    """The epoch's (or window's) rates are written ahead, but a callback that sets the learning rate (or the weight
    decay) in on_train_batch_begin runs the step in lockstep: the tables follow from that step on, as the plain
    path. (Weight decay switched on mid-epoch read a table of zeros: the weights went to zero.)"""
    from gpucnn.callbacks import LambdaCallback
    monkeypatch.setattr(fastpath, "READ_EVERY", 2)
    x, y = small_data(40)

    def train():
        m = small_model(optimizer=optimizers.SGD(0.05, momentum=0.9))

        def halve(batch, logs):
            if batch % 2 == 1:
                m.optimizer.learning_rate = m.optimizer.learning_rate / 2
            if batch == 2:  # weight decay switched on mid-epoch (the rate unchanged): new graphs, its factors filled
                m.optimizer.weight_decay = 0.3
        data = (x, y) if feed == "arrays" else (_Batches(x, y, 16), None)
        return m, m.fit(*data, batch_size=16 if feed == "arrays" else None, epochs=2, shuffle=False, verbose=0,
                        callbacks=[LambdaCallback(on_train_batch_begin=halve)])
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert len(cpu_fast_path) == 1
    _assert_same_training(plain, fast)


def test_the_cpu_fast_path_shuffles_from_the_seed_and_reads_metrics_as_it_goes(cpu_fast_path, monkeypatch):
    monkeypatch.setattr(fastpath, "READ_EVERY", 2)
    x, y = small_data(100)
    seen = []

    from gpucnn.callbacks import Callback

    class Record(Callback):
        batch_hooks_use_model = False  # (reads logs only: the steps run ahead, the logs as the reads give them)

        def on_train_batch_end(self, batch, logs=None):
            seen.append(dict(logs or {}))

    runs = []
    for _ in range(2):
        set_random_seed(9)
        m = small_model()
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[Record()])
        runs.append(m.get_weights())
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)
    perm = cpu_fast_path[0].perm.get()
    assert sorted(perm.tolist()) == list(range(100)) and perm.tolist() != list(range(100))
    assert not seen[0] and seen[2] and "loss" in seen[2]  # a read after every READ_EVERY steps
    assert seen[12]["loss"] > 0 and 0 <= seen[12]["accuracy"] <= 1


@pytest.mark.parametrize("feed", ["arrays", "batches"])
def test_shuffle_batch_trains_the_same_batches_on_both_engines(feed, cpu_fast_path, monkeypatch):
    """shuffle="batch" (Keras's: for arrays the same batches, each one's samples in a new order; a dataset's batches
    in a new order, as True): the fast path draws the order as the plain path does, so the same training; for
    arrays it is the unshuffled batches' training, up to the order of the sums (before, "batch" shuffled every
    sample, silently)."""
    x, y = small_data(40)

    def train(shuffle):
        def run():
            m = small_model()
            data = (x, y) if feed == "arrays" else (_Batches(x, y, 8), None)
            return m, m.fit(*data, batch_size=None if feed == "batches" else 8, epochs=2, shuffle=shuffle, verbose=0)
        return run
    plain, fast = _trained_on_both_engines(monkeypatch, train("batch"))
    _assert_same_training(plain, fast)
    if feed == "arrays":
        unshuffled, _ = _trained_on_both_engines(monkeypatch, train(False))
        _assert_same_training(plain, unshuffled)


def test_a_diverging_cpu_fast_path_raises(cpu_fast_path):
    m = small_model(optimizer=optimizers.SGD(1e30))
    x, y = small_data(40, "normal")
    with pytest.raises(models.TrainingDivergedError):
        m.fit(x * 1e10, y, batch_size=8, epochs=3, verbose=0)


def test_the_cpu_fast_path_waits_for_the_default_stream_and_leaves_no_step_in_flight(cpu_fast_path, monkeypatch):
    # Each epoch starts after the default stream's work (weights set by callbacks between epochs), and an
    # exception out of an epoch (here divergence) first waits for the steps already launched.
    events = []
    monkeypatch.setattr(_FakeCupy.cuda.Device, "synchronize", lambda self: events.append("device sync"))
    monkeypatch.setattr(_Stream, "synchronize", lambda self: events.append("stream sync"))
    replay = _Replay.launch
    monkeypatch.setattr(_Replay, "launch", lambda self, stream=None: (events.append("step"), replay(self, stream)))
    m = small_model(optimizer=optimizers.SGD(0.01))
    x, y = small_data(40, "normal")
    m.fit(x, y, batch_size=16, epochs=2, verbose=0)
    starts = [i for i, e in enumerate(events) if e == "step" and (i == 0 or events[i - 1] != "step")]
    assert len(starts) == 2
    for i in starts:  # the last synchronisation before an epoch's first step is the device's
        assert [e for e in events[:i] if e != "step"][-1] == "device sync"
    events.clear()
    m = small_model(optimizer=optimizers.SGD(1e30))
    with pytest.raises(models.TrainingDivergedError):
        m.fit(x * 1e10, y, batch_size=8, epochs=3, verbose=0)
    assert "step" in events and events[-1] == "stream sync"


def test_a_logs_only_batch_hook_gets_the_last_steps_logs_from_batches_on_the_cpu_fast_path(cpu_fast_path,
                                                                                          monkeypatch):
    """Batches of a known length, a callback that reads logs only (the steps run ahead): the streamed trainer reads
    the epoch's last step before its hooks, as the array trainer does, so TerminateOnNaN sees a divergence within
    the epoch (it saw none before the epoch ended: fit raised instead of stopping)."""
    from gpucnn.callbacks import Callback
    x, y = small_data(40)
    seen = []

    class Look(Callback):
        batch_hooks_use_model = False

        def on_train_batch_end(self, batch, logs=None):
            seen.append(dict(logs or {}))
    m = small_model(optimizer=optimizers.SGD(0.05))
    m.fit(_Batches(x, y, 8), epochs=1, verbose=0, callbacks=[Look()])
    assert len(cpu_fast_path) == 1 and len(seen) == 5
    assert not seen[3] and seen[4]["loss"] == m.history.history["loss"][0]


@_gpu
@pytest.mark.parametrize("use", ["predict_at_epoch_end", "set_weights_in_getitem"])
def test_dataset_code_that_uses_the_model_is_ordered_with_the_fast_paths_steps(use, monkeypatch, gpu_engine):
    """A PyDataset that uses the model while the streamed trainer's steps run ahead on their non-blocking stream:
    predicting in on_epoch_end (hard-example mining) or setting weights in __getitem__. The default stream, where
    that runs, now waits for the steps launched so far, and the next steps for it (event waits around each pull).
    Unordered before: the emulator's stream-order check failed it (on a GPU: a read of half-updated weights, or a
    set_weights overwritten by an update in flight). Trains as the plain CUDA path."""
    from gpucnn.utils import PyDataset
    x, y = small_data(40)

    class Data(PyDataset):
        def __init__(self, model):
            super().__init__()
            self.model, self.scores = model, []

        def __len__(self):
            return 5

        def __getitem__(self, i):
            if use == "set_weights_in_getitem" and i == 3:
                dense = self.model.layers[-1]
                dense.set_weights([w * np.float32(0.5) for w in dense.get_weights()])
            return x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]

        def on_epoch_end(self):
            if use == "predict_at_epoch_end":
                self.scores.append(self.model.predict(x, verbose=0))

    scores = []

    def fit(m):
        data = Data(m)
        m.fit(data, epochs=2, verbose=0, shuffle=False)
        scores.append(data.scores)
    _plain_and_fast_cuda_fits(monkeypatch, lambda: optimizers.SGD(0.05, momentum=0.9), fit)
    for a, b in zip(*scores):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("feed", ["arrays", "batches"])
def test_batch_hooks_get_each_steps_logs_on_the_cpu_fast_path(feed, cpu_fast_path, monkeypatch):
    """A callback's on_train_batch_end gets that step's running loss and accuracy at every step, as on the plain
    path (and in Keras): the fast path's slots were read only every READ_EVERY steps, so the hooks got {} (a
    LambdaCallback reading logs["loss"] failed) or an earlier step's means."""
    from gpucnn.callbacks import LambdaCallback
    monkeypatch.setattr(fastpath, "READ_EVERY", 2)  # windows of two steps (the streamed trainer's tables)
    x, y = small_data(38)  # the last batch of 6
    seen = {}

    def train():
        m = small_model(optimizer=optimizers.SGD(0.05, momentum=0.9))
        logs = seen.setdefault(backend.engine(), [])
        data = (x, y) if feed == "arrays" else (_Batches(x, y, 8), None)
        hook = LambdaCallback(on_train_batch_end=lambda batch, logs=None, kept=logs: kept.append(
            (batch, logs["loss"], logs["accuracy"])))
        return m, m.fit(*data, batch_size=8 if feed == "arrays" else None, epochs=2, shuffle=False, verbose=0,
                        callbacks=[hook])
    plain, fast = _trained_on_both_engines(monkeypatch, train)
    assert len(cpu_fast_path) == 1
    assert [b for b, _, _ in seen["cuda"]] == [b for b, _, _ in seen["numpy"]] == [0, 1, 2, 3, 4] * 2
    np.testing.assert_allclose([v[1:] for v in seen["cuda"]], [v[1:] for v in seen["numpy"]], rtol=1e-5)
    _assert_same_training(plain, fast)


def test_a_batch_callback_that_may_use_the_model_runs_the_cpu_fast_path_in_lockstep(cpu_fast_path,
                                                                                    monkeypatch):
    from gpucnn.callbacks import Callback, TerminateOnNaN

    class Look(Callback):  # may read or change the weights after each step
        def on_train_batch_end(self, batch, logs=None):
            pass

    m = small_model(optimizer=optimizers.SGD(0.01))
    x, y = small_data(40, "normal")
    for callbacks, lockstep in (([Look()], True), ([TerminateOnNaN()], False), ([], False)):
        events = []
        with monkeypatch.context() as mp:
            mp.setattr(_Stream, "synchronize", lambda self: events.append("stream sync"))
            replay = _Replay.launch
            mp.setattr(_Replay, "launch",
                       lambda self, stream=None, replay=replay: (events.append("step"), replay(self, stream)))
            m.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=callbacks)
        steps = [i for i, e in enumerate(events) if e == "step"]
        waited = [events[i + 1] == "stream sync" for i in steps]
        assert len(steps) == 5
        assert all(waited) if lockstep else not any(waited[:-1])
