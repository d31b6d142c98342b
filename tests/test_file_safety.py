"""Hostile and accidental files, and where saving writes (test plan rows 20 and 22, continued): every refusal
is InvalidModelFile naming what is wrong; values that pass the checksum but make no sense are refused; a
small file cannot make loading allocate much; saving writes through symbolic links, refuses what is not a
regular writable file, names the target in its errors, and cleans up after a killed writer; a refused load
leaves gpucnn's random generator as it was."""
import fcntl
import io
import os
import signal
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from test_saving import members, rewrite, tiny_model, trained

from gpucnn import models, saving, utils
from gpucnn.saving import InvalidModelFile

pytestmark = pytest.mark.usefixtures("numpy_engine")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.gpucnn"
    trained().save(path)
    return path


def npz(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def replace_state(path, slot, change):
    with np.load(io.BytesIO(members(path)["optimizer.npz"])) as f:
        arrays = dict(f)
    change(arrays[slot])
    rewrite(path, {"optimizer.npz": npz(**arrays)})


def replace_weight(path, key, value):
    with np.load(io.BytesIO(members(path)["weights.npz"])) as f:
        arrays = dict(f)
    arrays[key] = value
    rewrite(path, {"weights.npz": npz(**arrays)})


def layer_config(h, i):
    return h["model_config"]["config"]["layers"][i]["config"]


def optimizer_config(h):
    return h["compile_config"]["optimizer"]["config"]


# ===================================================================================== InvalidModelFile, always
@pytest.mark.parametrize("edit,match", [
    (lambda h: h["model_config"]["config"].update(input_shape=[float("inf"), 8, 1]), "(?i)input shape"),
    (lambda h: h["model_config"]["config"].update(input_shape=[8.5, 8, 1]), "(?i)input shape"),
    (lambda h: layer_config(h, 0).update(filters=float("inf")), "filters must be a positive int"),
    (lambda h: layer_config(h, 4).update(units=10**400), "more weights than the file holds"),
    (lambda h: h.update(optimizer_iterations=float("inf")), "iterations"),
    (lambda h: h.update(optimizer_iterations=2**70), "iterations"),
    (lambda h: optimizer_config(h).update(learning_rate=10**400), "learning_rate must be a finite number"),
    (lambda h: optimizer_config(h).update(learning_rate=float("inf")), "learning_rate must be a finite"),
    (lambda h: optimizer_config(h).update(learning_rate=-1e-3), "learning_rate must be a number >= 0"),
    (lambda h: h["compile_config"].update(weight_decay_exclusions={"var_names": ["("], "weights": []}),
     "weight-decay exclusion pattern"),
    (lambda h: h["compile_config"].update(weight_decay_exclusions={"var_names": [], "weights": [["nope", 0]]}),
     "exclusion \\['nope', 0\\] names no weight"),
    (lambda h: h["compile_config"].update(weight_decay_exclusions={"var_names": [], "weights": [["dense", 7]]}),
     "names no weight"),
    (lambda h: optimizer_config(h).update(epsilon=float("nan")), "epsilon must be a finite"),
    (lambda h: optimizer_config(h).update(epsilon=-1e-7), "epsilon must be a small non-negative"),
    (lambda h: optimizer_config(h).update(rho=float("nan")), "rho"),
    (lambda h: h["rng_state"]["state"].update(state=2**200), "random-generator state"),
    (lambda h: h["rng_state"]["state"].update(state=-1), "random-generator state"),
    (lambda h: h["rng_state"].update(has_uint32=0.5), "random-generator state"),
    (lambda h: h.update(layer_rng_states={"dropout": {"bit_generator": "PCG64"}}), "random state"),
    (lambda h: h.update(layer_rng_states=[]), "random states"),
])
def test_insane_values_that_pass_the_checksum_are_refused(saved, edit, match):
    rewrite(saved, header=edit)
    with pytest.raises(InvalidModelFile, match=match):
        models.load_model(saved)


@pytest.mark.parametrize("slot,change,match", [
    ("velocity", lambda v: v.__setitem__(0, -1.0), "negative"),
    ("velocity", lambda v: v.__setitem__(3, np.nan), "NaN or infinity"),
    ("velocity", lambda v: v.__setitem__(3, np.inf), "NaN or infinity"),
])
def test_insane_optimizer_state_is_refused(saved, slot, change, match):
    replace_state(saved, slot, change)
    with pytest.raises(InvalidModelFile, match=match):
        models.load_model(saved)


def test_weights_that_overflow_float32_are_refused(saved, tmp_path):
    replace_weight(saved, "02_dense_kernel", np.full((36, 3), 1e300))  # finite as float64, inf as float32
    with pytest.raises(InvalidModelFile, match="NaN or infinity"):
        models.load_model(saved)
    arrays = saving._weight_arrays(trained(), "w.npz")
    np.savez(tmp_path / "w.npz", **{**arrays, min(arrays): np.full((3, 3, 1, 4), -1e300)})
    with pytest.raises(InvalidModelFile, match="NaN or infinity"):
        tiny_model().load_weights(tmp_path / "w.npz")


def test_every_flipped_byte_of_a_weights_file_is_refused_or_harmless(tmp_path):
    """One flip at every byte, and every value of each member's compression method: a weights file either
    loads the same weights or is refused with InvalidModelFile, never another exception."""
    model = trained()
    path = tmp_path / "w.npz"
    model.save_weights(path)
    raw = path.read_bytes()
    want = model.get_weights()
    methods = {start + offset for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10))
               for start in range(len(raw)) if raw.startswith(signature, start)}
    other = tiny_model()
    other.build()
    refused = 0
    for pos in range(len(raw)):
        for value in (range(256) if pos in methods else [raw[pos] ^ 0x5A]):
            damaged = bytearray(raw)
            damaged[pos] = value
            path.write_bytes(bytes(damaged))
            try:
                other.load_weights(path)
            except InvalidModelFile:
                refused += 1
                continue
            for a, b in zip(other.get_weights(), want):
                np.testing.assert_array_equal(a, b)
    assert refused > len(raw) // 2


# ===================================================================================== small files, small costs
def refusal(load):
    """(the InvalidModelFile message ``load()`` raises, the most memory it allocated meanwhile)."""
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModelFile) as e:
            load()
        return str(e.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_small_file_declaring_a_huge_layer_is_refused_without_allocating(saved):
    """A file of a few KB whose config says Dense(10**6) (36 million weights after the Flatten) is refused
    before the layer's weights are drawn."""
    rewrite(saved, header=lambda h: layer_config(h, 4).update(units=10**6))
    assert saved.stat().st_size < 20_000
    message, peak = refusal(lambda: models.load_model(saved))
    assert "more weights than the file holds" in message and peak < 8 * 2**20


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2])
def test_a_zip_bomb_is_refused_before_it_is_decompressed(saved, compression):
    """weights.npz replaced by 64 MB of zeros (a few KB compressed, its checksum right): refused from the
    sizes the zip declares, without decompressing it."""
    parts = members(saved)
    bomb = bytes(64 * 2**20)
    rewrite(saved, {"weights.npz": bomb})
    parts = members(saved)  # rewrite fixed the checksums; now store the bomb compressed
    with zipfile.ZipFile(saved, "w", compression) as zf:
        for name, data in parts.items():
            zf.writestr(name, data)
    del parts, bomb
    assert saved.stat().st_size < 2**20
    message, peak = refusal(lambda: models.load_model(saved))
    assert "weights.npz declares 67,108,864 bytes" in message and peak < 8 * 2**20


def test_an_array_header_declaring_a_huge_shape_is_refused_without_allocating(tmp_path):
    path = tmp_path / "w.npz"
    trained().save_weights(path)
    parts = members(path)
    kernel = min(parts)  # its header says (3, 3, 1, 4): make it claim 4 GB of data it does not hold
    parts[kernel] = parts[kernel].replace(b"(3, 3, 1, 4)", b"(999999999,)")
    with zipfile.ZipFile(path, "w") as zf:  # with the right CRCs
        for name, data in parts.items():
            zf.writestr(name, data)
    message, peak = refusal(lambda: tiny_model().load_weights(path))
    assert "(999999999,)" in message and peak < 8 * 2**20


# ===================================================================================== where saving writes
def test_saving_through_a_symbolic_link_updates_the_file_it_names(tmp_path):
    (tmp_path / "real").mkdir()
    real, link = tmp_path / "real" / "m.gpucnn", tmp_path / "m.gpucnn"
    trained().save(real)
    link.symlink_to(real)
    model = trained(epochs=2)
    model.save(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    loaded = models.load_model(real)
    np.testing.assert_array_equal(loaded.get_weights()[0], model.get_weights()[0])
    assert sorted(os.listdir(tmp_path / "real")) == ["m.gpucnn"]


def test_what_is_not_a_regular_writable_file_is_refused_and_left_alone(tmp_path):
    model = trained()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        model.save(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        model.save_weights(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        saving.save_model(model, os.devnull)
    readonly = tmp_path / "readonly.gpucnn"
    readonly.write_bytes(b"mine")
    readonly.chmod(0o444)
    with pytest.raises(PermissionError, match="read-only"):
        model.save(readonly)
    assert readonly.read_bytes() == b"mine"
    kept = tmp_path / "kept.npz"
    kept.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        saving.save_weights(model, kept, overwrite=False)
    saving.save_weights(model, tmp_path / "new.npz", overwrite=False)
    assert kept.read_bytes() == b"mine" and sorted(os.listdir(tmp_path)) == [
        "fifo", "kept.npz", "new.npz", "readonly.gpucnn"]


def test_errors_name_the_target_not_the_temporary(tmp_path):
    target = tmp_path / "missing" / "m.gpucnn"
    with pytest.raises(FileNotFoundError) as e:
        trained().save(target)
    assert str(target) in str(e.value) and ".tmp" not in str(e.value)


KILLED_WRITER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from gpucnn.utils import atomic_write
with atomic_write(sys.argv[2]) as f:
    f.write(b"half a file")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_writer_killed_mid_save_leaves_a_temporary_that_the_next_save_or_load_removes(tmp_path):
    path = tmp_path / "m.gpucnn"
    trained().save(path)
    good = path.read_bytes()

    def kill_a_writer():
        run = subprocess.run([sys.executable, "-c", KILLED_WRITER, ROOT, str(path)], timeout=60)
        assert run.returncode == -signal.SIGKILL
        left = [name for name in os.listdir(tmp_path) if name != "m.gpucnn"]
        assert len(left) == 1 and left[0].startswith(".m.gpucnn.") and path.read_bytes() == good

    kill_a_writer()
    models.load_model(path)
    assert os.listdir(tmp_path) == ["m.gpucnn"]
    kill_a_writer()
    live = tmp_path / ".m.gpucnn.abcd1234.tmp"  # a write still going on in another process: kept
    live.write_bytes(b"")
    with open(live, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        trained().save(path)
        assert sorted(os.listdir(tmp_path)) == [live.name, "m.gpucnn"]
    other = tmp_path / ".other.gpucnn.abcd1234.tmp"  # another file's: not this save's business
    other.write_bytes(b"")
    utils.remove_stale_temporaries(path)
    assert sorted(os.listdir(tmp_path)) == [other.name, "m.gpucnn"]


# ===================================================================================== the random state
def test_a_refused_load_leaves_the_random_state_as_it_was(saved):
    replace_weight(saved, "02_dense_kernel", np.full((36, 3), np.nan))  # refused after the model is built
    utils.set_random_seed(4)
    before = utils.rng().bit_generator.state
    with pytest.raises(InvalidModelFile):
        models.load_model(saved)
    assert utils.rng().bit_generator.state == before


def test_loading_without_restore_rng_draws_nothing(tmp_path):
    path = tmp_path / "m.gpucnn"
    trained().save(path)
    utils.set_random_seed(4)
    before = utils.rng().bit_generator.state
    models.load_model(path, restore_rng=False)
    assert utils.rng().bit_generator.state == before
    models.load_model(path)
    assert utils.rng().bit_generator.state != before


def test_a_frozen_weights_saved_optimizer_state_must_fit_it(tmp_path):
    """optimizer.npz may hold the state of a weight that does not train now (parked_<k>_<slot>): only for such a
    weight, of its size, of the optimizer's slots, and sane."""
    model = trained()
    model.layers[0].trainable = False
    path = tmp_path / "m.gpucnn"
    model.save(path)
    with np.load(io.BytesIO(members(path)["optimizer.npz"])) as f:
        assert sorted(k for k in f.files if k.startswith("parked")) == ["parked_000_velocity", "parked_001_velocity"]
    assert models.load_model(path).optimizer.parked  # (a sound file loads, its frozen state set aside)
    for key, value, match in (("parked_000_velocity", np.zeros(7, np.float32), "does not fit"),
                              ("parked_002_velocity", np.zeros(36 * 3, np.float32), "does not fit"),  # trains now
                              ("parked_000_momentum", np.zeros(36, np.float32), "does not fit"),  # not RMSprop's
                              ("parked_000_velocity", np.full(36, -1, np.float32), "negative")):
        model.save(path)
        with np.load(io.BytesIO(members(path)["optimizer.npz"])) as f:
            arrays = dict(f)
        arrays[key] = value
        rewrite(path, {"optimizer.npz": npz(**arrays)})
        with pytest.raises(InvalidModelFile, match=match):
            models.load_model(path)
