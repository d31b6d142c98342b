"""Saving and loading: a whole model (architecture, weights, optimizer state) or its weights alone.

A model file is a zip archive holding:

- ``model.json``: format version, ``model.get_config()``, the compile config (optimizer name and
  ``get_config()``, loss name, metrics), the optimizer's ``iterations``, gpucnn's random-generator state
  (so a resumed run draws the same shuffles as an uninterrupted one) and the sha256 of every other member;
- ``weights.npz``: the weights, as ``save_weights`` writes them;
- ``optimizer.npz``: the optimizer's flat state buffers (absent until the first training step).

Nothing in a file is ever executed: arrays are read with ``np.load(..., allow_pickle=False)``, layers are
constructed only from ``gpucnn.layers.LAYER_CLASSES``, and a file that is truncated, altered or names
anything unknown is refused with ``InvalidModelFile``. (The model itself is built from the config by
``gpucnn.models.load_model``; this module reads and writes the file.) Every write goes to a temporary file in the same
directory, is flushed to disk, then replaces the target in one step: a crash leaves the old file intact.
"""
import hashlib
import io
import json
import zipfile
import zlib

import numpy as np

from . import backend, losses as losses_mod, optimizers as optimizers_mod
from .utils import atomic_write, rng

FORMAT = "gpucnn.model"
FORMAT_VERSION = 1
_JSON, _WEIGHTS, _OPTIMIZER = "model.json", "weights.npz", "optimizer.npz"
_MAX_JSON_BYTES = 16 * 2**20


class InvalidModelFile(ValueError):
    """A model or weights file is corrupt, truncated, of another format, or names something unknown."""


# ===================================================================================== public API
def save_model(model, path, model_config=None, overwrite=True):
    """Write ``model`` (architecture, weights, compile config, optimizer state, RNG state) to ``path``.
    ``model_config``: the architecture as ``{"class_name", "config"}`` (``gpucnn.models.serialization``)."""
    model._require_built("save")
    weights = _npz_bytes(_weight_arrays(model))
    members = {_WEIGHTS: weights}
    opt = model.optimizer
    if opt is not None and opt.state is not None:
        members[_OPTIMIZER] = _npz_bytes({k: backend.to_numpy(v) for k, v in opt.state.items()})
    from . import __version__
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gpucnn_version": __version__,
        "model_config": model.get_config() if model_config is None else model_config,
        "compile_config": None if opt is None else {
            "optimizer": {"name": opt.name, "config": opt.get_config()},
            "loss": model.loss.name,
            "metrics": list(model.metrics)},
        "optimizer_iterations": None if opt is None else int(opt.iterations),
        "rng_state": rng().bit_generator.state,
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    with atomic_write(path) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(_JSON, json.dumps(header, indent=1))
        for name, data in members.items():
            zf.writestr(name, data)


def read_model_file(path):
    """``(header, {member: bytes})`` of a model file, verified (checksums, format); InvalidModelFile on any defect.
    ``gpucnn.models.load_model`` builds the model from ``header["model_config"]``, then ``restore_model_state``."""
    return _read_model_file(path)


def restore_model_state(model, header, members, path, restore_rng=True):
    """Set a model rebuilt from a file's config to the file's weights, compile config and optimizer state (and,
    with ``restore_rng``, gpucnn's random state at saving time)."""
    _set_weights_from_npz(model, members[_WEIGHTS], path)
    if header.get("compile_config") is not None:
        _compile_from_config(model, header, members.get(_OPTIMIZER), path)
    if restore_rng:
        _restore_rng(header.get("rng_state"), path)


def save_weights(model, path):
    """Write the weights to an ``.npz`` (float32 arrays keyed ``00_conv2d_kernel``, ... in Keras's order)."""
    model._require_built("save_weights")
    data = _npz_bytes(_weight_arrays(model))
    with atomic_write(path) as f:
        f.write(data)


def load_weights(model, path):
    """Load weights written by ``save_weights`` (or the weights of a ``save_model`` file) into ``model``.

    The arrays are matched by position; their count, kind (kernel/bias) and shapes must match the model.
    """
    model._require_built("load_weights")
    raw = _read_bytes(path)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            is_model_file = _JSON in zf.namelist()
    except (zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise InvalidModelFile(f"{path}: not a gpucnn weights file ({exc})") from None
    data = _read_model_file(path, raw)[1][_WEIGHTS] if is_model_file else raw
    _set_weights_from_npz(model, data, path)


# ===================================================================================== writing
def _npz_bytes(arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _weight_arrays(model):
    """{``00_conv2d_kernel``: array, ...}: every weight, numbered in Keras's order."""
    out, i = {}, 0
    for layer in model._all_layers():
        for name, value in zip(layer.weight_names, layer.get_weights()):
            out[f"{i:02d}_{layer.name}_{name}"] = value
            i += 1
    return out


# ===================================================================================== reading
def _read_bytes(path):
    with open(path, "rb") as f:  # a missing file is FileNotFoundError, not InvalidModelFile
        return f.read()


def _read_model_file(path, raw=None):
    """Open, verify and return ``(header, {member: bytes})``; raise InvalidModelFile on any defect."""
    raw = _read_bytes(path) if raw is None else raw
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            info = zf.getinfo(_JSON)
            if info.file_size > _MAX_JSON_BYTES:
                raise InvalidModelFile(f"{path}: {_JSON} is implausibly large ({info.file_size} bytes)")
            header = json.loads(zf.read(_JSON).decode("utf-8"))
            if not isinstance(header, dict) or header.get("format") != FORMAT:
                raise InvalidModelFile(f"{path}: not a gpucnn model file")
            if header.get("format_version") != FORMAT_VERSION:
                raise InvalidModelFile(f"{path}: format version {header.get('format_version')!r} is not "
                                       f"supported (this gpucnn reads version {FORMAT_VERSION})")
            sums = header.get("sha256")
            if not isinstance(sums, dict) or _WEIGHTS not in sums:
                raise InvalidModelFile(f"{path}: the header lists no checksums")
            members = {}
            for name, expected in sums.items():
                if name not in (_WEIGHTS, _OPTIMIZER):
                    raise InvalidModelFile(f"{path}: unexpected member {name!r}")
                data = zf.read(name)
                if hashlib.sha256(data).hexdigest() != expected:
                    raise InvalidModelFile(f"{path}: checksum mismatch in {name}: the file is corrupt")
                members[name] = data
    except InvalidModelFile:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError, UnicodeDecodeError, ValueError,
            NotImplementedError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise InvalidModelFile(
            f"{path}: not a valid gpucnn model file ({type(exc).__name__}: {exc})") from None
    return header, members


def _load_npz(data, path, what):
    """{key: array} from npz bytes, refusing pickles and object arrays (nothing in them is run)."""
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise InvalidModelFile(f"{path}: {what} is not an .npz archive")
        with npz:
            arrays = {key: npz[key] for key in npz.files}
    except InvalidModelFile:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise InvalidModelFile(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from None
    for key, value in arrays.items():
        if value.dtype.kind != "f":
            raise InvalidModelFile(f"{path}: {what} array {key!r} has dtype {value.dtype}, not float")
    return arrays


def _set_weights_from_npz(model, data, path):
    arrays = _load_npz(data, path, "weights")
    expected = [(layer, name, tuple(w.shape)) for layer in model._all_layers()
                for name, w in zip(layer.weight_names, layer.weights)]
    ordered = []
    for key in arrays:
        index, _, rest = key.partition("_")
        if not index.isdigit() or not rest:
            raise InvalidModelFile(f"{path}: unexpected weights key {key!r} (expected like 00_conv2d_kernel)")
        ordered.append((int(index), rest, arrays[key]))
    ordered.sort(key=lambda t: t[0])
    if [t[0] for t in ordered] != list(range(len(expected))):
        raise InvalidModelFile(f"{path}: the file holds {len(ordered)} weight arrays, the model has "
                               f"{len(expected)}")
    for (i, rest, value), (layer, name, shape) in zip(ordered, expected):
        if rest.rsplit("_", 1)[-1] != name or value.shape != shape:
            raise InvalidModelFile(f"{path}: weight {i} ({rest}, shape {value.shape}) does not fit "
                                   f"layer {layer.name!r}'s {name} of shape {shape}")
        if not np.all(np.isfinite(value)):
            raise InvalidModelFile(f"{path}: weight {i} ({rest}) contains NaN or infinity")
    model.set_weights([t[2] for t in ordered])


def _compile_from_config(model, header, optimizer_data, path):
    try:
        cc = header["compile_config"]
        opt_name = cc["optimizer"]["name"]
        if opt_name not in optimizers_mod.OPTIMIZERS:
            raise InvalidModelFile(f"{path}: unknown optimizer {opt_name!r}")
        kwargs = {k: v for k, v in cc["optimizer"]["config"].items() if k != "name"}
        optimizer = optimizers_mod.OPTIMIZERS[opt_name](**kwargs)
        if cc["loss"] not in losses_mod.LOSSES:
            raise InvalidModelFile(f"{path}: unknown loss {cc['loss']!r}")
        model.compile(optimizer=optimizer, loss=cc["loss"], metrics=list(cc["metrics"]))
        iterations = header["optimizer_iterations"]
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise InvalidModelFile(f"{path}: invalid optimizer iterations {iterations!r}")
    except InvalidModelFile:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidModelFile(f"{path}: invalid compile config ({type(exc).__name__}: {exc})") from None
    optimizer.iterations = iterations
    if optimizer_data is None:
        return
    state = _load_npz(optimizer_data, path, "optimizer state")
    n = int(model._params.shape[0])
    if set(state) != set(optimizer._slots) or any(v.shape != (n,) for v in state.values()):
        raise InvalidModelFile(f"{path}: optimizer state {sorted(state)} does not fit a {opt_name} "
                               f"optimizer over {n} parameters")
    optimizer.build(n)
    for slot, value in state.items():
        optimizer.state[slot][...] = backend.ops().xp.asarray(value.astype(np.float32))


def _restore_rng(state, path):
    generator = rng().bit_generator
    if not isinstance(state, dict) or state.get("bit_generator") != type(generator).__name__:
        raise InvalidModelFile(f"{path}: invalid random-generator state")
    try:
        generator.state = state
    except (TypeError, ValueError, KeyError) as exc:
        raise InvalidModelFile(f"{path}: invalid random-generator state ({exc})") from None
