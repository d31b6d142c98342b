"""Saving and loading (test plan rows 20 and 22): round trips, a resumed run equal to an uninterrupted one,
atomic writes, and refusal of truncated, altered or hostile files without running anything from them.
Also the Keras weight layouts that make ``get_weights``/``set_weights`` an interchange format."""
import builtins
import hashlib
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from gpucnn import backend, callbacks, layers, losses, metrics, models, optimizers, saving, utils
from gpucnn.saving import InvalidModelFile


pytestmark = pytest.mark.usefixtures("numpy_engine")


def tiny_model(dropout_seed=None):
    return models.Sequential([
        layers.Conv2D(4, 3, activation="relu", input_shape=(8, 8, 1)),
        layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dropout(0.25, seed=dropout_seed),
        layers.Dense(3, activation="softmax"),
    ])


def tiny_data(n=40, seed=0):
    r = np.random.default_rng(seed)
    y = r.integers(0, 3, n)
    x = r.random((n, 8, 8, 1)).astype(np.float32) * 0.1
    for i, c in enumerate(y):
        x[i, c * 2:c * 2 + 3, 2:5, 0] += 1.0
    return x, y


def trained(optimizer="rmsprop", epochs=1):
    model = tiny_model()
    model.compile(optimizer, "sparse_categorical_crossentropy", ["accuracy"])
    x, y = tiny_data()
    model.fit(x, y, batch_size=8, epochs=epochs, verbose=0)
    return model


def opt_state(model):
    return {k: backend.to_numpy(v).copy() for k, v in model.optimizer.state.items()}


# ===================================================================================== round trips
def test_model_round_trip_keeps_everything(tmp_path):
    model = trained(optimizers.SGD(0.05, momentum=0.9, nesterov=True))
    path = tmp_path / "m.gpucnn"
    model.save(path)
    loaded = models.load_model(path)
    assert loaded.get_config() == model.get_config()
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert loaded.optimizer.iterations == model.optimizer.iterations == 5
    assert loaded.loss.name == "sparse_categorical_crossentropy" and loaded.metrics == ["accuracy"]
    for slot, value in opt_state(model).items():
        np.testing.assert_array_equal(opt_state(loaded)[slot], value)
    x, _ = tiny_data(6)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["model.json", "optimizer.npz", "weights.npz"]
        header = json.loads(zf.read("model.json"))
    assert header["format_version"] == 1  # (2 only for a file holding frozen weights' optimizer state)
    assert header["model_config"]["class_name"] == "Sequential"
    assert [l["class_name"] for l in header["model_config"]["config"]["layers"]] == [
        "Conv2D", "MaxPooling2D", "Flatten", "Dropout", "Dense"]


def test_uncompiled_and_untrained_models_round_trip(tmp_path):
    model = tiny_model()
    model.save(tmp_path / "a")
    loaded = models.load_model(tmp_path / "a")
    assert loaded.optimizer is None
    np.testing.assert_array_equal(loaded.get_weights()[0], model.get_weights()[0])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.save(tmp_path / "b")  # compiled, but no step yet: no optimizer state
    loaded = models.load_model(tmp_path / "b")
    assert loaded.optimizer.name == "adam" and loaded.optimizer.state is None and loaded.metrics == []


@pytest.mark.parametrize("optimizer,dropout_seed", [("rmsprop", None), ("adam", None), ("sgd", None),
                                                    ("rmsprop", 17),  # a Dropout's own generator, saved too
                                                    ("adamw", None)])
def test_resumed_training_equals_uninterrupted_training(tmp_path, optimizer, dropout_seed):
    x, y = tiny_data()

    def fresh():
        utils.clear_session()
        utils.set_random_seed(7)
        model = tiny_model(dropout_seed)
        model.compile(optimizers.SGD(0.1, momentum=0.9) if optimizer == "sgd" else
                      optimizers.AdamW(0.01, weight_decay=0.3) if optimizer == "adamw" else optimizer,
                      "sparse_categorical_crossentropy", ["accuracy"])
        return model

    straight = fresh()
    straight.fit(x, y, batch_size=8, epochs=4, verbose=0)

    first = fresh()
    first.fit(x, y, batch_size=8, epochs=2, verbose=0)
    first.save(tmp_path / "ckpt")
    utils.set_random_seed(12345)  # another session: different random state, another model built
    tiny_model(dropout_seed).build()
    resumed = models.load_model(tmp_path / "ckpt")
    history = resumed.fit(x, y, batch_size=8, epochs=4, verbose=0, initial_epoch=2)

    assert history.epoch == [2, 3]
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)  # bitwise
    assert resumed.optimizer.iterations == straight.optimizer.iterations == 20
    for slot, value in opt_state(straight).items():
        np.testing.assert_array_equal(opt_state(resumed)[slot], value)


def test_a_layer_frozen_after_training_saves_and_resumes_as_frozen(tmp_path):
    """Freezing after a fit, then saving (no compile, no fit between): the file's optimizer state is laid out over
    the weights trainable now, so the loaded model resumes as the original goes on."""
    x, y = tiny_data()
    utils.set_random_seed(7)
    model = tiny_model()
    model.compile(optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, verbose=0)
    model.layers[0].trainable = False
    model.save(tmp_path / "ckpt")
    loaded = models.load_model(tmp_path / "ckpt")
    assert not loaded.layers[0].trainable
    for m in (model, loaded):
        utils.set_random_seed(1)  # the same Dropout masks
        m.fit(x, y, batch_size=8, verbose=0, shuffle=False)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("loss", [losses.BinaryCrossentropy(from_logits=True),
                                  losses.BinaryCrossentropy(label_smoothing=0.2),
                                  losses.SparseCategoricalCrossentropy(from_logits=True)], ids=str)
def test_the_loss_options_are_saved(tmp_path, loss):
    """from_logits and label_smoothing come back with the model (they were dropped: a loaded logits model
    evaluated and trained with the loss of probabilities); a file that names the loss alone still loads."""
    utils.set_random_seed(2)
    units = 1 if isinstance(loss, losses.BinaryCrossentropy) else 3
    model = models.Sequential([layers.Input((4,)), layers.Dense(units)])
    model.compile("adam", loss, metrics=[metrics.BinaryAccuracy(name="acc") if units == 1 else
                                         metrics.SparseCategoricalAccuracy(name="acc")])
    x = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    y = (np.arange(10) % 2).astype(np.float32)[:, None] if units == 1 else np.arange(10) % 3
    model.fit(x, y, verbose=0)
    model.save(tmp_path / "m")
    loaded = models.load_model(tmp_path / "m")
    assert loaded.loss.get_config() == model.loss.get_config()
    assert loaded.metrics == model.metrics == ["acc"]
    assert loaded.evaluate(x, y, verbose=0) == model.evaluate(x, y, verbose=0)
    rewrite(tmp_path / "m", header=lambda h: h["compile_config"].update(loss=loss.name))  # an older file
    assert models.load_model(tmp_path / "m").loss.get_config() == {"name": loss.name}


def test_saving_a_sub_model_during_another_models_fit_changes_nothing_in_it(tmp_path):
    """An encoder (one layer frozen since its compile) saved at every epoch of a classifier's fit that shares its
    layers: the save writes the encoder's state over its trainable weights without laying any buffer out again
    (it did, and the shared layers then read a buffer the classifier no longer trained: training stopped)."""
    def run(save):
        utils.set_random_seed(8)
        inp = layers.Input((4,))
        enc = models.Model(inp, layers.Dense(5, name="e2")(layers.Dense(5, name="e1")(inp)))
        enc.compile("sgd", "categorical_crossentropy")
        clf = models.Model(inp, layers.Dense(2, activation="softmax")(enc.output))
        clf.compile("sgd", "sparse_categorical_crossentropy")
        enc.get_layer("e1").trainable = False
        seen = []

        def each(epoch, logs):
            if save:
                enc.save(tmp_path / f"enc{epoch}.gpucnn")
            seen.append(clf.get_layer("e2").get_weights()[0].copy())
        x = np.random.default_rng(0).standard_normal((32, 4)).astype(np.float32)
        clf.fit(x, np.arange(32) % 2, batch_size=8, epochs=3, verbose=0,
                callbacks=[callbacks.LambdaCallback(on_epoch_end=each)])
        return seen
    saved, plain = run(True), run(False)
    assert not np.array_equal(saved[0], saved[2])
    for a, b in zip(saved, plain):
        np.testing.assert_array_equal(a, b)
    assert not models.load_model(tmp_path / "enc2.gpucnn").get_layer("e1").trainable


def test_kerass_saving_namespace_compile_false_and_safe_mode(tmp_path):
    """keras.saving.load_model / save_model as Keras spells them (the first reached gpucnn's internal reader and
    raised a TypeError); load_model(compile=False) gives the model uncompiled; safe_mode is accepted."""
    model = trained()
    saving.save_model(model, tmp_path / "m.keras")
    loaded = saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.optimizer.iterations == model.optimizer.iterations and loaded.loss.name == model.loss.name
    bare = models.load_model(tmp_path / "m.keras", compile=False)
    assert bare.optimizer is None and bare.loss is None
    for a, b in zip(bare.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="compile the model before calling fit"):
        bare.fit(*tiny_data(4), verbose=0)


@pytest.mark.parametrize("kind", ["h5", "keras"])
def test_a_file_keras_wrote_is_named_as_such(tmp_path, kind):
    path = tmp_path / f"m.{kind}"
    if kind == "h5":
        path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("metadata.json", "{}")
            zf.writestr("config.json", "{}")
            zf.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    what = r"an HDF5 file \(Keras.s .h5" if kind == "h5" else r"a Keras 3 .keras archive"
    with pytest.raises(InvalidModelFile, match=f"is {what}.*which gpucnn does not read.*set_weights"):
        models.load_model(path)
    with pytest.raises(InvalidModelFile, match=f"is {what}"):
        trained().load_weights(path)


def test_save_weights_keeps_a_file_when_told_not_to_overwrite(tmp_path):
    """save_weights(path, overwrite=False) refuses to replace a file (it was replaced silently: the argument was
    not passed on); load_weights takes Keras's skip_mismatch=False and refuses True by name."""
    model = trained()
    model.save_weights(tmp_path / "w.npz")
    before = (tmp_path / "w.npz").read_bytes()
    model.set_weights([np.zeros_like(w) for w in model.get_weights()])
    with pytest.raises(FileExistsError):
        model.save_weights(tmp_path / "w.npz", overwrite=False)
    assert (tmp_path / "w.npz").read_bytes() == before
    model.load_weights(tmp_path / "w.npz", skip_mismatch=False)
    assert np.abs(model.get_weights()[0]).max() > 0
    with pytest.raises(NotImplementedError, match="skip_mismatch=True"):
        model.load_weights(tmp_path / "w.npz", skip_mismatch=True)
    assert model.metrics_names == ["loss", "accuracy"] == ["loss"] + model.metrics


def test_save_weights_keys_and_load_into_a_fresh_model(tmp_path):
    model = trained()
    model.save_weights(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz", allow_pickle=False) as npz:
        assert npz.files == ["00_conv2d_kernel", "01_conv2d_bias", "02_dense_kernel", "03_dense_bias",
                             saving.KERAS_ORDER]
        assert npz["00_conv2d_kernel"].shape == (3, 3, 1, 4)
    other = tiny_model()  # same architecture, other layer names (conv2d_1, ...)
    other.load_weights(tmp_path / "w.npz")
    for a, b in zip(other.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
    model.save(tmp_path / "m.gpucnn")
    third = tiny_model()
    third.load_weights(tmp_path / "m.gpucnn")  # the weights of a whole-model file
    np.testing.assert_array_equal(third.get_weights()[2], model.get_weights()[2])
    with np.load(tmp_path / "w.npz", allow_pickle=False) as w:  # the README's way to a Keras model, without gpucnn
        listed = [w[k] for k in sorted((k for k in w.files if k[:1].isdigit()), key=lambda k: int(k.split("_")[0]))]
    for a, b in zip(listed, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_weights_refuses_another_architecture(tmp_path):
    trained().save_weights(tmp_path / "w.npz")
    wider = models.Sequential([layers.Conv2D(5, 3, activation="relu", input_shape=(8, 8, 1)),
                               layers.MaxPooling2D(2), layers.Flatten(), layers.Dense(3)])
    with pytest.raises(InvalidModelFile, match=r"weight 0 \(conv2d_kernel, shape \(3, 3, 1, 4\)\) does not "
                                               r"fit layer 'conv2d_\d+''s kernel of shape \(3, 3, 1, 5\)"):
        wider.load_weights(tmp_path / "w.npz")
    deeper = models.Sequential([layers.Conv2D(4, 3, input_shape=(8, 8, 1)), layers.Flatten(),
                                layers.Dense(4), layers.Dense(3)])
    with pytest.raises(InvalidModelFile, match="holds 4 weight arrays, the model has 6"):
        deeper.load_weights(tmp_path / "w.npz")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load_model(tmp_path / "nothing.gpucnn")


# ===================================================================================== atomic writes
def test_a_crash_mid_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.gpucnn"
    trained().save(path)
    good = path.read_bytes()
    real = zipfile.ZipFile.writestr
    calls = []

    def crash_on_second_member(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "writestr", crash_on_second_member)
    with pytest.raises(OSError, match="disk full"):
        trained(epochs=2).save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["m.gpucnn"]
    models.load_model(path)


def test_a_crash_before_sync_leaves_the_old_weights_file(tmp_path, monkeypatch):
    path = tmp_path / "w.npz"
    trained().save_weights(path)
    good = path.read_bytes()

    def fail(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="I/O error"):
        trained(epochs=2).save_weights(path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["w.npz"]


# ===================================================================================== damaged files
def members(path):
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def rewrite(path, replace=(), header=None, fix_sums=True):
    """Rewrite a model file with some members replaced (checksums updated, so only the content is bad)."""
    parts = members(path)
    parts.update(dict(replace))
    head = json.loads(parts["model.json"])
    if header:
        header(head)
    if fix_sums:
        head["sha256"] = {n: hashlib.sha256(parts[n]).hexdigest() for n in head["sha256"]}
    parts["model.json"] = json.dumps(head).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in parts.items():
            zf.writestr(name, data)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.gpucnn"
    trained().save(path)
    return path


@pytest.mark.parametrize("keep", [0, 10, 100, 0.5, -22, -1])
def test_truncated_files_are_refused(saved, keep):
    raw = saved.read_bytes()
    saved.write_bytes(raw[:int(len(raw) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(InvalidModelFile):
        models.load_model(saved)
    with pytest.raises(InvalidModelFile):
        tiny_model().load_weights(saved)


def test_every_flipped_byte_is_refused_or_harmless(saved):
    raw = saved.read_bytes()
    reference = models.load_model(saved)
    state = utils.rng().bit_generator.state
    refused = 0
    for pos in range(0, len(raw), max(1, len(raw) // 300)):
        damaged = bytearray(raw)
        damaged[pos] ^= 0x5A
        saved.write_bytes(bytes(damaged))
        try:
            model = models.load_model(saved)
        except InvalidModelFile:
            refused += 1
            continue
        # a flip in zip metadata that nothing reads (a timestamp): the content must be intact
        assert model.get_config() == reference.get_config()
        assert utils.rng().bit_generator.state == state
        for a, b in zip(model.get_weights(), reference.get_weights()):
            np.testing.assert_array_equal(a, b)
    assert refused > 250


def test_a_member_altered_behind_the_zip_is_caught_by_its_checksum(saved):
    parts = members(saved)
    with np.load(io.BytesIO(parts["weights.npz"])) as npz:
        arrays = dict(npz)
    arrays["02_dense_kernel"][0, 0] += 1.0
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    rewrite(saved, {"weights.npz": buf.getvalue()}, fix_sums=False)  # a valid zip, a stale checksum
    with pytest.raises(InvalidModelFile, match="checksum mismatch in weights.npz"):
        models.load_model(saved)


class Payload:
    """Unpickling this creates a file: the proof that a loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def object_npz(marker, key="00_conv2d_kernel"):
    buf = io.BytesIO()
    np.savez(buf, **{key: np.array([Payload(marker)], dtype=object)})
    return buf.getvalue()


def test_the_payload_would_run_if_unpickled(tmp_path):
    with np.load(io.BytesIO(object_npz(tmp_path / "proof")), allow_pickle=True) as npz:
        npz["00_conv2d_kernel"]
    assert (tmp_path / "proof").exists()


@pytest.mark.parametrize("member,kind", [("weights.npz", "object-array"), ("weights.npz", "pickle"),
                                         ("optimizer.npz", "object-array"), ("optimizer.npz", "pickle")])
def test_pickles_inside_a_model_file_never_run(saved, tmp_path, member, kind):
    marker = tmp_path / "pwned"
    data = object_npz(marker, "velocity") if kind == "object-array" else pickle.dumps(Payload(marker))
    rewrite(saved, {member: data})
    with pytest.raises(InvalidModelFile):
        models.load_model(saved)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["object-array", "pickle"])
def test_pickles_as_a_weights_file_never_run(tmp_path, kind):
    marker, path = tmp_path / "pwned", tmp_path / "w.npz"
    path.write_bytes(object_npz(marker) if kind == "object-array" else pickle.dumps(Payload(marker)))
    with pytest.raises(InvalidModelFile):
        tiny_model().load_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize("class_name", ["Lambda", "os.system", "Sequential", "Layer", ["Conv2D"]])
def test_unknown_layer_classes_are_refused(saved, class_name):
    rewrite(saved, header=lambda h: h["model_config"]["config"]["layers"][0].update(class_name=class_name))
    # "Sequential" names a nested model, whose config a Conv2D's is not
    match = "invalid model config" if class_name == "Sequential" else "unknown layer class|not a string"
    with pytest.raises(InvalidModelFile, match=match):
        models.load_model(saved)


@pytest.mark.parametrize("edit,match", [
    (lambda h: h["model_config"]["config"]["layers"][0]["config"].update(function="print"), "invalid model config"),
    (lambda h: h["model_config"]["config"]["layers"][0]["config"].update(filters=5), "does not fit layer"),
    (lambda h: h["compile_config"]["optimizer"].update(name="evil"), "unknown optimizer"),
    (lambda h: h["compile_config"].update(loss="mse"), "unknown loss"),
    (lambda h: h["compile_config"].update(loss={"name": "binary_crossentropy", "gamma": 2}), "unknown options"),
    (lambda h: h["compile_config"].update(loss={"name": "binary_crossentropy", "label_smoothing": 3}),
     "invalid loss"),
    (lambda h: h["compile_config"].update(loss=["binary_crossentropy"]), "unknown loss"),
    (lambda h: h["compile_config"].update(metrics=[{"class_name": "AUC", "config": {}}]), "invalid metrics"),
    (lambda h: h.update(format_version=99), "format version 99"),
    (lambda h: h.update(format="pickle"), "not a gpucnn model file"),
    (lambda h: h.pop("model_config"), "invalid model config"),
    (lambda h: h.update(rng_state={"bit_generator": "MT19937"}), "random-generator state"),
    (lambda h: h.update(optimizer_iterations=-3), "iterations"),
])
def test_bad_headers_are_refused(saved, edit, match):
    rewrite(saved, header=edit)
    with pytest.raises(InvalidModelFile, match=match):
        models.load_model(saved)


def test_wrong_weight_shapes_inside_a_model_file(saved):
    with np.load(io.BytesIO(members(saved)["weights.npz"])) as npz:
        arrays = dict(npz)
    arrays["02_dense_kernel"] = arrays["02_dense_kernel"][:-1]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    rewrite(saved, {"weights.npz": buf.getvalue()})
    with pytest.raises(InvalidModelFile, match=r"shape \(35, 3\)\) does not fit layer 'dense'"):
        models.load_model(saved)


def test_non_float_and_non_finite_weights_are_refused(tmp_path):
    model = trained()
    arrays = saving._weight_arrays(model, "w.npz")
    for key, bad, match in [("01_conv2d_bias", np.array(["a"] * 4), "dtype <U1, not float"),
                            ("01_conv2d_bias", np.array([np.nan, 0, 0, 0], np.float32), "NaN")]:
        np.savez(tmp_path / "w.npz", **{**arrays, key: bad})
        with pytest.raises(InvalidModelFile, match=match):
            model.load_weights(tmp_path / "w.npz")


def test_invalid_model_file_is_a_value_error():
    assert issubclass(InvalidModelFile, ValueError)


# ===================================================================================== Keras layouts
def test_keras_layouts_give_the_hand_computed_forward_pass():
    """Weights built by hand in Keras's layouts — conv (kh, kw, in, out), dense (in, units), Flatten in
    (H, W, C) order — give exactly the forward pass computed by hand: the interchange contract."""
    r = np.random.default_rng(3)
    x = r.normal(size=(2, 4, 5, 2))
    kernel = r.normal(size=(3, 2, 2, 3))  # (kh, kw, in, out)
    bias = r.normal(size=3)
    dense_kernel = r.normal(size=(2 * 4 * 3, 2))  # (in, units) over the flattened (2, 4, 3) maps
    dense_bias = r.normal(size=2)
    model = models.Sequential([layers.Conv2D(3, (3, 2), activation="relu", input_shape=(4, 5, 2)),
                               layers.Flatten(), layers.Dense(2)])
    model.set_weights([kernel, bias, dense_kernel, dense_bias])

    expected = np.zeros((2, 2))
    for n in range(2):
        maps = np.zeros((2, 4, 3))  # (H, W, C)
        for i in range(2):
            for j in range(4):
                for c in range(3):
                    total = bias[c]
                    for di in range(3):
                        for dj in range(2):
                            for ci in range(2):
                                total += x[n, i + di, j + dj, ci] * kernel[di, dj, ci, c]
                    maps[i, j, c] = max(total, 0.0)
        flat = [maps[i, j, c] for i in range(2) for j in range(4) for c in range(3)]  # channels fastest
        for u in range(2):
            expected[n, u] = dense_bias[u] + sum(f * dense_kernel[k, u] for k, f in enumerate(flat))
    np.testing.assert_allclose(model.predict(x.astype(np.float32), verbose=0), expected, rtol=1e-5,
                               atol=1e-5)
    for got, given in zip(model.get_weights(), [kernel, bias, dense_kernel, dense_bias]):
        np.testing.assert_array_equal(got, given.astype(np.float32))  # the same arrays come back out


# ===================================================================================== Keras's layer order
def shortcut_first_model(suffix=""):
    """A residual block whose shortcut convolution is called before the main path (all of one shape): Keras lists
    its layers by depth (stem, main1, main2, bn, short), not in call order (stem, short, main1, main2, bn)."""
    utils.set_random_seed(7)
    inputs = layers.Input(shape=(6, 6, 2))
    stem = layers.Conv2D(3, 3, padding="same", name="stem" + suffix)(inputs)
    short = layers.Conv2D(3, 3, padding="same", name="short" + suffix)(stem)
    main = layers.Conv2D(3, 3, padding="same", name="main1" + suffix)(stem)
    main = layers.BatchNormalization(name="bn" + suffix)(layers.Conv2D(3, 3, padding="same", name="main2" + suffix)(main))
    x = layers.Flatten()(layers.Add()([main, short]))
    m = models.Model(inputs, layers.Dense(3, activation="softmax", name="head" + suffix)(x))
    m.compile(optimizers.RMSprop(0.01), "sparse_categorical_crossentropy")
    return m


def block_data(n=8):
    r = np.random.default_rng(4)
    return r.standard_normal((n, 6, 6, 2)).astype(np.float32), r.integers(0, 3, n)


def by_name(model):
    return {layer.name: [w.copy() for w in layer.get_weights()] for layer in model._all_layers()}


def test_a_file_in_the_call_order_of_earlier_versions_loads_by_layer_name(tmp_path, monkeypatch):
    """Earlier gpucnn versions wrote a functional model's weights, and packed its optimizer state, in the order its
    layers were called. Such a file loads by layer name — weights and optimizer state in their places — and
    training goes on exactly as the saved model's would."""
    x, y = block_data()
    with monkeypatch.context() as old_version:
        old_version.setattr(models.Model, "_all_layers", models.Model._layers_in_call_order)
        arrays = saving._weight_arrays
        old_version.setattr(saving, "_weight_arrays", lambda m, p: {k: v for k, v in arrays(m, p).items()
                                                                 if k != saving.KERAS_ORDER})
        original = shortcut_first_model()
        assert [layer.name for layer in original._all_layers()][:4] == ["stem", "short", "main1", "main2"]
        original.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # optimizer state to save
        original.save(tmp_path / "old.gpucnn")
        with zipfile.ZipFile(tmp_path / "old.gpucnn") as zf, np.load(io.BytesIO(zf.read("weights.npz"))) as npz:
            assert npz.files[1:3] == ["01_stem_bias", "02_short_kernel"]  # the call order
        original.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        want = by_name(original)
    loaded = models.load_model(tmp_path / "old.gpucnn")
    assert [layer.name for layer in loaded._all_layers()][:5] == ["stem", "main1", "main2", "bn", "short"]
    loaded.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    got = by_name(loaded)
    assert got.keys() == want.keys()
    for name in want:
        for a, b in zip(got[name], want[name]):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_weights_of_a_model_with_branches_load_by_name_or_by_position_in_the_files_order(tmp_path, monkeypatch):
    """A weights file is numbered in Keras's order and says so; a model takes it by its layer names when they are
    the file's (any order), else by position (another instance of the architecture, other names). A file of an
    earlier version (call order, no KERAS_ORDER) goes by position in call order."""
    model = shortcut_first_model()
    model.save_weights(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as npz:
        assert [k.split("_", 1)[1] for k in npz.files][:4] == ["stem_kernel", "stem_bias", "main1_kernel",
                                                              "main1_bias"]
    for other in (shortcut_first_model(), shortcut_first_model("_2")):  # the same names; other names
        other.load_weights(tmp_path / "w.npz")
        for a, b in zip(other.get_weights(), model.get_weights()):
            np.testing.assert_array_equal(a, b)
    with monkeypatch.context() as old_version:  # an earlier version's file: call order, no marker
        old_version.setattr(models.Model, "_all_layers", models.Model._layers_in_call_order)
        arrays = saving._weight_arrays
        old_version.setattr(saving, "_weight_arrays", lambda m, p: {k: v for k, v in arrays(m, p).items()
                                                                 if k != saving.KERAS_ORDER})
        model.save_weights(tmp_path / "old.npz")
    renamed = shortcut_first_model("_3")
    renamed.load_weights(tmp_path / "old.npz")
    for a, b in zip(renamed.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_models_own_weights_file_loads_when_nested_models_repeat_layer_names(tmp_path):
    """Layer names are unique within a model, not across the models nested in it: such a file cannot go by name,
    and goes by position in the order it says it has."""
    def block(name):
        inputs = layers.Input(shape=(6, 6, 3))
        short = layers.Conv2D(3, 1, name="conv_short")(inputs)
        main = layers.Conv2D(3, 3, padding="same", name="conv")(inputs)
        return models.Model(inputs, layers.Add()([main, short]), name=name)

    utils.set_random_seed(2)
    inputs = layers.Input(shape=(6, 6, 3))
    m = models.Model(inputs, block("b2")(block("b1")(inputs)))
    assert len({layer.name for layer in m._all_layers()}) < len(m._all_layers())
    saved = m.get_weights()
    m.save_weights(tmp_path / "w.npz")
    m.set_weights([np.zeros_like(w) for w in saved])
    m.load_weights(tmp_path / "w.npz")
    for a, b in zip(m.get_weights(), saved):
        np.testing.assert_array_equal(a, b)


def test_a_file_whose_seeded_initializers_ask_for_more_weights_than_it_holds_is_refused_before_drawing(tmp_path):
    """Seeded and constant initializers do not draw from gpucnn's generator, which meters a file's weight budget
    while it loads: they charge the budget themselves (a crafted file allocated hundreds of MB before its refusal)."""
    from gpucnn import initializers
    m = models.Sequential([layers.Input((4,)), layers.Dense(3, kernel_initializer=initializers.HeNormal(seed=1))])
    m.save(tmp_path / "m.gpucnn")
    rewrite(tmp_path / "m.gpucnn", header=lambda h: h["model_config"]["config"]["layers"][0]["config"].update(
        units=10**9))
    with pytest.raises(InvalidModelFile, match="more weights than the file holds"):
        models.load_model(tmp_path / "m.gpucnn")


def test_weights_that_are_not_finite_are_not_saved_and_the_saved_file_stays(tmp_path):
    """load refuses a file with NaN or infinite weights, so save refuses to write one: over a good file it would
    lose the model saved there."""
    model = tiny_model()
    x, y = tiny_data()
    model.compile("rmsprop", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.gpucnn")
    model.save_weights(tmp_path / "w.npz")
    good = [(tmp_path / name).read_bytes() for name in ("m.gpucnn", "w.npz")]
    model.layers[-1].weights[1][0] = np.inf  # a diverged bias
    for write in (lambda: model.save(tmp_path / "m.gpucnn"), lambda: model.save_weights(tmp_path / "w.npz")):
        with pytest.raises(ValueError, match="bias of layer 'dense.*' holds NaN or infinity.*left as it was"):
            write()
    assert [(tmp_path / name).read_bytes() for name in ("m.gpucnn", "w.npz")] == good
    model.layers[-1].weights[1][0] = 0
    model.optimizer.state["velocity"][0] = np.nan  # RMSprop's mean of squares
    with pytest.raises(ValueError, match="optimizer's velocity holds NaN"):
        model.save(tmp_path / "m.gpucnn")
    assert (tmp_path / "m.gpucnn").read_bytes() == good[0]


def test_a_file_with_a_negative_moving_variance_is_refused(tmp_path):
    model = models.Sequential([layers.Input((4,)), layers.BatchNormalization(), layers.Dense(2)])
    weights = model.get_weights()
    model.save_weights(tmp_path / "w.npz")
    with np.load(tmp_path / "w.npz") as npz:
        arrays = {key: npz[key] - 3 if "moving_variance" in key else npz[key] for key in npz.files}
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(InvalidModelFile, match="moving_variance must be >= 0"):
        model.load_weights(tmp_path / "w.npz")
    for a, b in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_save_weights_never_replaces_a_saved_model(tmp_path):
    """A weights file under a whole model's name (Keras: .keras) would pass for one, and replace it: refused, the
    model file kept."""
    model = tiny_model()
    model.save(tmp_path / "m.keras")
    saved = (tmp_path / "m.keras").read_bytes()
    for name in ("m.keras", "M.KERAS", "other.gpucnn"):
        with pytest.raises(ValueError, match="whole saved model.*'model.weights.npz'.*model.save"):
            model.save_weights(tmp_path / name)
    model.save(tmp_path / "m.h5")  # a model file under a name that does not say so
    with pytest.raises(FileExistsError, match="holds a whole saved model"):
        model.save_weights(tmp_path / "m.h5")
    assert (tmp_path / "m.keras").read_bytes() == saved and not (tmp_path / "other.gpucnn").exists()
    assert models.load_model(tmp_path / "m.h5").count_params() == model.count_params()
    model.save_weights(tmp_path / "m.weights.npz")
    model.save_weights(tmp_path / "m.weights.npz")  # a weights file is replaced as before


def test_load_model_on_a_weights_file_says_what_it_is(tmp_path):
    model = tiny_model()
    model.save_weights(tmp_path / "w.weights.npz")
    with pytest.raises(InvalidModelFile, match="holds weights alone.*model.load_weights"):
        models.load_model(tmp_path / "w.weights.npz")


def test_a_saved_model_keeps_the_weights_excluded_from_weight_decay(tmp_path):
    """A resumed AdamW run decays the weights the saved one decayed, no others: exclude_from_weight_decay's
    var_names and var_list travel in the file (else the biases would start decaying after loading)."""
    x, y = tiny_data()

    def build():
        utils.set_random_seed(5)
        model = models.Sequential([layers.Input((8, 8, 1)), layers.Conv2D(3, 3), layers.Flatten(),
                                   layers.BatchNormalization(), layers.Dense(3, activation="softmax")])
        opt = optimizers.AdamW(0.01, weight_decay=0.3)
        model.compile(opt, "sparse_categorical_crossentropy")
        opt.exclude_from_weight_decay(var_list=[model.layers[0].kernel], var_names=["bias", "gamma"])
        return model
    straight, resumed = build(), build()
    straight.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    resumed.save(tmp_path / "m.gpucnn")
    loaded = models.load_model(tmp_path / "m.gpucnn")
    assert loaded.optimizer.decay_exclusions(loaded._weight_slots()) == {
        "var_names": ["bias", "gamma"], "weights": [[loaded.layers[0].name, 0]]}
    loaded.fit(x, y, batch_size=8, epochs=2, initial_epoch=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_model_saved_with_a_frozen_layer_keeps_its_state_and_resumes_exactly(tmp_path):
    """A layer frozen after training has its optimizer state set aside; the file keeps it, so a model loaded and
    unfrozen trains on as the saved one would (the resumed run equals the uninterrupted one bit for bit)."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(8, 6, 6, 3)).astype(np.float32), rng.integers(0, 3, 8)

    def run(save):
        utils.set_random_seed(0)
        model = models.Sequential([layers.Input((6, 6, 3)), layers.Conv2D(4, 3, name="c1"),
                                   layers.GlobalAveragePooling2D(), layers.Dense(3, activation="softmax")])
        model.compile(optimizers.Adam(0.01), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=4, verbose=0)
        model.get_layer("c1").trainable = False
        model.fit(x, y, batch_size=4, epochs=2, initial_epoch=1, verbose=0)
        if save:
            model.save(tmp_path / "m.gpucnn")
            with zipfile.ZipFile(tmp_path / "m.gpucnn") as zf, np.load(io.BytesIO(zf.read("optimizer.npz"))) as npz:
                assert sorted(npz.files) == ["m", "parked_000_m", "parked_000_v", "parked_001_m", "parked_001_v", "v"]
                header = json.loads(zf.read("model.json"))
            assert header["format_version"] == 2 and header["optimizer_state_of"] == [0, 1, 2, 3]
            model = models.load_model(tmp_path / "m.gpucnn")
        model.get_layer("c1").trainable = True
        model.fit(x, y, batch_size=4, epochs=3, initial_epoch=2, verbose=0)
        return model
    straight, resumed = run(False), run(True)
    assert resumed.optimizer.iterations == straight.optimizer.iterations == 6
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_saved_optimizer_refuses_the_weights_the_saved_one_would(tmp_path, optimizer):
    """The file lists the weights the optimizer has a state for: a layer frozen since it trained trains on after
    loading (also under plain SGD, which keeps no state buffers), one frozen from the start and unfrozen before
    saving is refused after loading as before (the zeros a file holds for it are no state of the optimizer's)."""
    x, y = tiny_data()

    def build():
        utils.set_random_seed(1)
        model = models.Sequential([layers.Input((8, 8, 1)), layers.Conv2D(2, 3, name="early"),
                                   layers.Conv2D(2, 3, name="late"), layers.Flatten(),
                                   layers.Dense(3, activation="softmax")])
        model.get_layer("late").trainable = False
        model.compile(optimizer, "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, verbose=0)
        model.get_layer("early").trainable = False  # trained, then frozen
        return model
    model = build()
    model.save(tmp_path / "frozen.gpucnn")
    model.get_layer("late").trainable = True  # never trained
    model.save(tmp_path / "unfrozen.gpucnn")
    model.compile(model.optimizer, "sparse_categorical_crossentropy")  # lays out zeros for it, accepted as Keras
    model.get_layer("late").trainable = False
    model.save(tmp_path / "refrozen.gpucnn")  # its zeros are not saved as a state of the optimizer's
    loaded = models.load_model(tmp_path / "frozen.gpucnn")
    loaded.get_layer("early").trainable = True
    loaded.fit(x, y, batch_size=8, verbose=0)
    for path in (tmp_path / "frozen.gpucnn", tmp_path / "unfrozen.gpucnn", tmp_path / "refrozen.gpucnn"):
        loaded = models.load_model(path)
        loaded.get_layer("late").trainable = True
        with pytest.raises(ValueError, match="has trained this model .*holds no state for 2 of the weights.*late"):
            loaded.fit(x, y, batch_size=8, verbose=0)


def test_weights_saved_under_an_hdf5_name_say_they_are_npz(tmp_path):
    """Keras 3 names weights files '.weights.h5': gpucnn writes its own .npz there (and reads it back), with a
    warning that Keras and h5py cannot read it (it was silent)."""
    import warnings

    import gpucnn as keras
    from gpucnn import saving
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = tmp_path / "model.weights.h5"
    saving._said["npz under an HDF5 name"] = False
    with pytest.warns(UserWarning, match="written in gpucnn's .npz format, not HDF5"):
        model.save_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_weights(tmp_path / "model.weights.npz")
        model.save_weights(tmp_path / "epoch_2.weights.h5")  # once per process: a checkpoint each epoch says it once
    saving._said["npz under an HDF5 name"] = False
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "ck{epoch}.weights.h5"), save_weights_only=True)
    classifier = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    classifier.compile("sgd", "sparse_categorical_crossentropy")
    with pytest.warns(UserWarning, match="not HDF5") as said:  # from fit's checkpoint: named at the fit call
        classifier.fit(np.zeros((4, 3), np.float32), np.zeros(4), epochs=2, verbose=0, callbacks=[checkpoint])
    assert len(said) == 1 and said[0].filename == __file__
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other.load_weights(path)
    for a, b in zip(other.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
