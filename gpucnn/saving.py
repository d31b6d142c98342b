"""Saving and loading: a whole model (architecture, weights, optimizer state) or its weights alone.

A model file is a zip archive holding:

- ``model.json``: format version, ``model.get_config()``, the compile config (optimizer name and
  ``get_config()``, loss name and options, metrics, weight-decay exclusions), the optimizer's ``iterations`` and
  which weights it has a state for (``optimizer_state_of``), gpucnn's random-generator state and that of every
  layer with a generator of its own (``Dropout(seed=...)``), so a resumed run draws the same shuffles and masks as
  an uninterrupted one, and the sha256 of every other member;
- ``weights.npz``: the weights, as ``save_weights`` writes them;
- ``optimizer.npz``: the optimizer's flat state buffers over the weights trained now (absent until the first
  training step), and the state of weights frozen since they trained (``PARKED_KEY``; such a file is format
  version 2, which earlier gpucnn versions say they cannot read; any other file is version 1).

The model is built from the file's architecture by ``gpucnn.models.load_model`` (this module reads and writes
files, and never imports the models). Nothing in a file is ever executed: arrays are read from their ``.npy``
headers and bytes (never unpickled),
layers are constructed only from ``gpucnn.layers.LAYER_CLASSES`` (and the classes the caller passes as
``custom_objects`` or registered with ``register_layer_class``). A file that is truncated, altered, names
anything unknown or holds values that make no sense (NaN weights, a negative learning rate) is refused with
``InvalidModelFile``. Sizes a file declares (zip members, array shapes, the parameters its architecture
implies) are checked against what it holds before anything is allocated or decompressed, so a small file
cannot make loading take much memory or time. Loading draws nothing from gpucnn's random generator; a
refused load leaves it as it was.

Every write goes to a temporary file in the same directory, is flushed to disk, then replaces the target in
one step (``gpucnn.utils.atomic_write``): a crash leaves the old file intact.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import re
import struct
import tokenize
import zipfile
import zlib

import numpy as np

from . import backend, layers as layers_mod, losses as losses_mod, metrics as metrics_mod, optimizers as optimizers_mod
from .layers.variables import Variable
from .utils import atomic_write, generator_in_use, remove_stale_temporaries, rng, set_generator_state

FORMAT = "gpucnn.model"
FORMAT_VERSION = 2  # what this gpucnn reads: 1 and 2. It writes 2 only for a file whose optimizer.npz holds the state
# of frozen weights (PARKED_KEY), which earlier versions would take for a damaged file; else 1, which they read
_JSON, _WEIGHTS, _OPTIMIZER = "model.json", "weights.npz", "optimizer.npz"
_MAX_JSON_BYTES = 16 * 2**20
_DEFLATE_MAX_RATIO = 1032  # no deflate stream expands more: a zip member declaring more is not genuine
_NPY_SLACK = 4096  # bytes an .npz spends per array besides the data: .npy header, zip entry (at most)
PARKED_KEY = "parked_{:03d}_{}"  # in optimizer.npz: the state of weight k (Keras's order) that does not train now
# What parsing the bytes of a damaged or hostile file can raise (JSONDecodeError is a ValueError).
_FILE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, KeyError, IndexError, UnicodeDecodeError, ValueError,
                TypeError, AttributeError, NotImplementedError, RecursionError, OverflowError, MemoryError,
                OSError, struct.error, tokenize.TokenError, SyntaxError)
_registered = layers_mod.REGISTERED_CLASSES  # layer classes by name (register_layer_class, register_keras_serializable)
_registered_schedules = {}  # learning-rate schedule classes by name (register_keras_serializable)
_registered_names = {}  # class -> Keras's registered name "package>name"
_registered_by_name = {}  # and back: "package>name" -> the class registered under it last


class InvalidModelFile(ValueError):
    """A model or weights file is corrupt, truncated, of another format, or names something unknown."""


# ===================================================================================== public API
def write_model(model, path, model_config=None, overwrite=True):
    """Write ``model`` (architecture, weights, compile config, optimizer state, random states) to ``path``.
    ``model_config``: the architecture as ``{"class_name", "config"}`` (``gpucnn.layers.serialize``).

    ``overwrite=False`` refuses to replace an existing file (Keras asks; gpucnn raises FileExistsError).
    A layer class gpucnn could not rebuild from the file is refused here, not when loading."""
    model._require_built("save")
    check_layer_classes(model)
    opt = model.optimizer
    _check_savable_rate(opt)
    weights = _npz_bytes(_weight_arrays(model, path))
    members = {_WEIGHTS: weights}
    state = model._state_for_file()  # over the weights trainable now, as the file's config says
    if state is not None:
        for slot, value in state.items():
            _refuse_nonfinite(value, f"the optimizer's {slot}", path)
        members[_OPTIMIZER] = _npz_bytes(state)
    from . import __version__
    header = {
        "format": FORMAT,
        "format_version": 2 if state is not None and set(state) - set(opt._slots) else 1,
        "gpucnn_version": __version__,
        "model_config": model.get_config() if model_config is None else model_config,
        "compile_config": None if opt is None else {
            "optimizer": {"name": opt.name, "config": opt.get_config()},
            "loss": model.loss.get_config(),  # its name, and from_logits / label_smoothing where set
            "metrics": list(getattr(model, "_metric_configs", model.metrics)),
            "weight_decay_exclusions": opt.decay_exclusions(model._weight_slots())},
        "optimizer_iterations": None if opt is None else int(opt.iterations),
        # the weights (by their place in Keras's order) the optimizer has a state of its own for: it refuses others
        "optimizer_state_of": None if opt is None else [
            k for k, (layer, i) in enumerate(model._weight_slots()) if (id(layer), i) in opt.known],
        "rng_state": rng().bit_generator.state,
        "layer_rng_states": _layer_random_states(model),
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    with atomic_write(path, overwrite) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(_JSON, json.dumps(header, indent=1))
        for name, data in members.items():
            zf.writestr(name, data)


def read_model(path, build, restore_rng=True, custom_objects=None, compile=True):
    """Rebuild a model written by ``write_model``: same layers, weights, compile config, optimizer state.
    ``build(config, classes, where)`` makes the (built) model from the file's architecture, constructing only
    the layer ``classes`` it is given (``gpucnn.models.load_model`` passes its builder; this module never
    imports the models).

    With ``restore_rng`` (the default) gpucnn's random generator is set back to its state at saving time,
    so ``fit(..., initial_epoch=k)`` continues exactly as the interrupted run would have; without it the
    generator is left as it is (loading draws nothing from it). Layers with a generator of their own
    (``Dropout(seed=...)``) always get theirs back. ``custom_objects``: ``{"MyLayer": MyLayer}``, your own
    layer classes (subclasses of ``gpucnn.layers.Layer``) by the names the file gives them. ``compile=False``:
    the model comes back uncompiled (no optimizer, loss or metrics), as Keras's.
    """
    classes = layer_classes(custom_objects)
    raw = _read_bytes(path)
    _refuse_keras_files(raw, path)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            names = zf.namelist()
            if _JSON not in names and names and all(name.endswith(".npy") for name in names):
                raise InvalidModelFile(f"{path} holds weights alone (save_weights writes such files), not a model: "
                                       "build the model in code and call model.load_weights on it, or save the "
                                       "whole model with model.save")
            header = _header(zf, path)
            declared = _member_info(zf, _WEIGHTS, path).file_size
            model = _build_within(build, header.get("model_config"), path, classes,
                                  max_params=declared // 2)  # 2 bytes a value at the least (float16)
            file_order = _set_weights_from_npz(model, _weights_member(zf, header, model, path), path)
            if compile and header.get("compile_config") is not None:
                _compile_from_config(model, header, zf, path, custom_objects, file_order)
            _restore_layer_random_states(model, header.get("layer_rng_states"), path)
            global_state = _checked_rng_state(header.get("rng_state"), path)
    except InvalidModelFile:
        raise
    except _FILE_ERRORS as exc:
        raise InvalidModelFile(
            f"{path}: not a valid gpucnn model file ({type(exc).__name__}: {exc})") from None
    if restore_rng:
        rng().bit_generator.state = global_state  # the last step: a refused file leaves it as it was
    return model


def save_weights(model, path, overwrite=True):
    """Write the weights to an ``.npz`` (float32 arrays keyed ``00_conv2d_kernel``, ... in Keras's order). A whole
    model's name (``.keras``, ``.gpucnn``) or a saved model at ``path`` is refused: weights alone would replace it."""
    check_weights_path(path, "save_weights")
    if os.path.isfile(path) and _is_model_file(path):
        raise FileExistsError(f"save_weights: {os.fspath(path)} holds a whole saved model (model.save); the weights "
                              "alone would replace it. Choose another name (e.g. 'model.weights.npz'), or delete it "
                              "first if it is no longer wanted")
    model._require_built("save_weights")
    data = _npz_bytes(_weight_arrays(model, path))
    with atomic_write(path, overwrite) as f:
        f.write(data)
    if os.fspath(path).lower().endswith((".h5", ".hdf5")) and not _said["npz under an HDF5 name"]:
        _said["npz under an HDF5 name"] = True  # once per process (a checkpoint each epoch would repeat it)
        import warnings
        warnings.warn(f"save_weights: {os.fspath(path)!r} is written in gpucnn's .npz format, not HDF5 (so is every "
                      "weights file gpucnn writes under a .h5 name): gpucnn's load_weights reads it back, Keras and "
                      "h5py cannot. Name it '.weights.npz' to say what it is; to move weights to Keras, see the "
                      "README's 'Moving weights between Keras and gpucnn'", stacklevel=_users_frame())


_said = {"npz under an HDF5 name": False}  # warnings given once per process


def _users_frame():
    """The ``stacklevel`` that makes a warning given by this function's caller name the first line outside gpucnn
    (the user's ``save_weights`` call, or the ``fit`` whose ModelCheckpoint saved)."""
    import sys
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


MODEL_SUFFIXES = (".keras", ".gpucnn")  # names of whole-model files, which a weights file must not take


def check_weights_path(path, who):
    """A ValueError when ``path`` ends as a whole model's file does (``.keras``, ``.gpucnn``): a weights file there
    would pass for a model, and replace one."""
    name = os.fspath(path)
    suffix = next((s for s in MODEL_SUFFIXES if name.lower().endswith(s)), None)
    if suffix:
        raise ValueError(f"{who}: {name!r} ends in {suffix}, the name of a whole saved model (model.save writes one); "
                         "weights alone go to a name such as 'model.weights.npz' (Keras: '.weights.h5'). To save the "
                         "whole model, use model.save")


def _is_model_file(path):
    """Whether ``path`` is a zip archive with a gpucnn model's header (a whole saved model)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return _JSON in zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def load_weights(model, path):
    """Load weights written by ``save_weights`` (or the weights of a ``save_model`` file) into ``model``.

    The arrays are matched by position; their count, kind (kernel/bias) and shapes must match the model.
    """
    model._require_built("load_weights")
    raw = _read_bytes(path)
    _refuse_keras_files(raw, path)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            if _JSON not in zf.namelist():
                data = raw
            else:
                data = _weights_member(zf, _header(zf, path), model, path)
            _set_weights_from_npz(model, data, path)
    except InvalidModelFile:
        raise
    except _FILE_ERRORS as exc:
        raise InvalidModelFile(f"{path}: not a gpucnn weights file ({type(exc).__name__}: {exc})") from None


def load_model(filepath, custom_objects=None, compile=True, safe_mode=True):
    """Keras's ``keras.saving.load_model``: ``gpucnn.models.load_model`` (a gpucnn file never holds code to run,
    so ``safe_mode`` has nothing to refuse)."""
    from .models import load_model as load
    return load(filepath, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)


def save_model(model, filepath, overwrite=True):
    """Keras's ``keras.saving.save_model``: ``model.save(filepath, overwrite)``."""
    model.save(filepath, overwrite=overwrite)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _refuse_keras_files(raw, path):
    """A file Keras wrote (HDF5 .h5 / .weights.h5, or a Keras 3 .keras archive): say so, and how to move weights."""
    what = None
    if raw.startswith(_HDF5_SIGNATURE):
        what = "an HDF5 file (Keras's .h5 / .weights.h5 format)"
    elif raw.startswith(b"PK"):
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                names = set(zf.namelist())
        except _FILE_ERRORS:
            return
        if _JSON not in names and "config.json" in names:
            what = "a Keras 3 .keras archive"
    if what:
        raise InvalidModelFile(f"{path} is {what}, which gpucnn does not read: gpucnn reads the files its own "
                               "model.save and save_weights write. To bring a Keras model's weights over, build the "
                               "same model in gpucnn and give it model.set_weights(keras_model.get_weights()) (the "
                               "same order and layouts), e.g. through np.savez of the list")


def register_layer_class(cls):
    """Make your layer class ``cls`` (a subclass of ``gpucnn.layers.Layer``, with a name of its own) known
    to ``load_model`` under its class name, as ``custom_objects`` would for one call. Usable as a class
    decorator; returns ``cls``."""
    name = _custom_class(cls.__name__ if isinstance(cls, type) else None, cls)
    if name in layers_mod.LAYER_CLASSES:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__} has the name of gpucnn's built-in {name}; "
                         "give your class a name of its own to register it")
    _registered[name] = cls
    return cls


def register_keras_serializable(package="Custom", name=None):
    """Keras's decorator for your own classes: ``@keras.saving.register_keras_serializable()`` above a Layer or a
    LearningRateSchedule subclass makes ``load_model`` rebuild it without ``custom_objects``. gpucnn's files name a
    class by its class name, so that is the name it is known by (``get_registered_name`` gives Keras's
    "package>name")."""
    if not isinstance(package, str) or (name is not None and not isinstance(name, str)):
        raise TypeError(f"register_keras_serializable(package=..., name=...) takes strings, got {package!r}, {name!r}")

    def decorator(cls):
        schedule = optimizers_mod.schedules.LearningRateSchedule
        if isinstance(cls, type) and issubclass(cls, schedule):
            if cls.__name__ in optimizers_mod.schedules.SCHEDULES:
                raise ValueError(f"{cls.__module__}.{cls.__qualname__} has the name of gpucnn's built-in schedule "
                                 f"{cls.__name__}; give your class a name of its own to register it")
            _registered_schedules[cls.__name__] = cls
        elif isinstance(cls, type) and issubclass(cls, layers_mod.Layer):
            register_layer_class(cls)
        else:
            raise TypeError(f"register_keras_serializable: gpucnn saves your own Layer and LearningRateSchedule "
                            f"subclasses; got {cls!r}")
        registered = f"{package}>{name or cls.__name__}"
        _registered_names[cls], _registered_by_name[registered] = registered, cls
        return cls
    return decorator


def get_registered_name(obj):
    """Keras's name for a class (or an object of it) registered with ``register_keras_serializable``; else its class
    name."""
    cls = obj if isinstance(obj, type) else type(obj)
    return _registered_names.get(cls, cls.__name__)


def get_registered_object(name, custom_objects=None, module_objects=None):
    """The class registered (or given in ``custom_objects``) under ``name``, its class name or Keras's "package>name";
    None if there is none."""
    for table in (custom_objects or {}, module_objects or {}):
        if name in table:
            return table[name]
    if name in _registered_by_name:
        return _registered_by_name[name]
    return _registered.get(name, _registered_schedules.get(name))


# ===================================================================================== writing
def _npz_bytes(arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


KERAS_ORDER = "keras_order"  # an empty array in a weights file whose weights are numbered in Keras's order


def _weight_arrays(model, path):
    """{``00_conv2d_kernel``: array, ...}: every weight, numbered in Keras's order, and the empty ``KERAS_ORDER``
    that says so (files of earlier gpucnn versions numbered a functional model's weights in call order). A weight
    that is not finite is refused (loading would refuse the file), before anything is written to ``path``."""
    out, i = {}, 0
    for layer in model._all_layers():
        for name, value in zip(layer.weight_names, layer.get_weights()):
            _refuse_nonfinite(value, f"the {name} of layer {layer.name!r}", path)
            out[f"{i:02d}_{layer.name}_{name}"] = value
            i += 1
    out[KERAS_ORDER] = np.zeros(0, np.float32)
    return out


def _refuse_nonfinite(value, what, path):
    if not np.isfinite(value).all():
        raise ValueError(f"not saved: {what} holds NaN or infinity, and a file with it could not be loaded ({path} "
                         "is left as it was). The model's training diverged: check the inputs are scaled (e.g. "
                         "divided by 255), lower the learning rate, and train it again")


def check_layer_classes(model):
    """Refuse a layer whose class the file could not name: a class of the user's named like a built-in
    (the file would load gpucnn's class of that name, silently other maths)."""
    for layer in model._all_layers():
        cls = type(layer)
        builtin = layers_mod.LAYER_CLASSES.get(cls.__name__)
        if builtin is not None and builtin is not cls:
            raise ValueError(
                f"cannot save layer {layer.name!r}: its class {cls.__module__}.{cls.__qualname__} has the name "
                f"of gpucnn's built-in {cls.__name__}, so the file would load as the built-in. Give your class "
                f"a name of its own (class My{cls.__name__}(layers.{cls.__name__}): ...), then load the file "
                f"with load_model(path, custom_objects={{'My{cls.__name__}': My{cls.__name__}}}) or after "
                "gpucnn.saving.register_layer_class(...)")


def _layer_random_states(model):
    """{layer name: its own generator's state} for the layers that have one."""
    states = {}
    for layer in model._all_layers():
        state = layer.random_state() if hasattr(layer, "random_state") else None
        if state is not None:
            states[layer.name] = state
    return states


# ===================================================================================== reading the archive
def _read_bytes(path):
    remove_stale_temporaries(path)
    with open(path, "rb") as f:  # a missing file is FileNotFoundError, not InvalidModelFile
        return f.read()


def _checked_size(info, path, limit=None):
    """Refuse a zip member whose declared size is impossible for what the archive holds, or above
    ``limit`` bytes, before a byte of it is decompressed."""
    possible = {zipfile.ZIP_STORED: info.compress_size,
                zipfile.ZIP_DEFLATED: _DEFLATE_MAX_RATIO * info.compress_size + 64}.get(info.compress_type)
    if possible is not None and info.file_size > possible:
        raise InvalidModelFile(f"{path}: member {info.filename} declares {info.file_size:,} bytes, more than "
                               f"its {info.compress_size:,} stored bytes can hold")
    if limit is not None and info.file_size > limit:
        raise InvalidModelFile(f"{path}: member {info.filename} declares {info.file_size:,} bytes; what it "
                               f"should hold takes at most {limit:,}")


def _header(zf, path):
    """The verified ``model.json`` of an open model file."""
    names = zf.namelist()
    if len(set(names)) != len(names):
        raise InvalidModelFile(f"{path}: the archive names a member twice")
    info = zf.getinfo(_JSON)
    _checked_size(info, path, _MAX_JSON_BYTES)
    header = json.loads(zf.read(info).decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise InvalidModelFile(f"{path}: not a gpucnn model file")
    if header.get("format_version") not in (1, FORMAT_VERSION):
        raise InvalidModelFile(f"{path}: format version {header.get('format_version')!r} is not "
                               f"supported (this gpucnn reads versions 1 and {FORMAT_VERSION})")
    sums = header.get("sha256")
    if not isinstance(sums, dict) or _WEIGHTS not in sums:
        raise InvalidModelFile(f"{path}: the header lists no checksums")
    for name in sums:
        if name not in (_WEIGHTS, _OPTIMIZER):
            raise InvalidModelFile(f"{path}: unexpected member {name!r}")
    return header


def _member_info(zf, name, path):
    info = zf.getinfo(name)
    _checked_size(info, path)
    return info


def _member(zf, header, name, path, limit):
    """A member's bytes, once its declared size is checked against ``limit`` and its checksum verified."""
    info = zf.getinfo(name)
    _checked_size(info, path, limit)
    data = zf.read(info)
    if hashlib.sha256(data).hexdigest() != header["sha256"][info.filename]:
        raise InvalidModelFile(f"{path}: checksum mismatch in {info.filename}: the file is corrupt")
    return data


def _npz_size_bound(shapes):
    """The most bytes an .npz of float arrays of these shapes takes (float64, the widest float accepted)."""
    return sum(8 * math.prod(shape) + _NPY_SLACK for shape in shapes) + _NPY_SLACK


def _weights_member(zf, header, model, path):
    shapes = [tuple(w.shape) for layer in model._all_layers() for w in layer.weights]
    return _member(zf, header, _WEIGHTS, path, _npz_size_bound(shapes))


# ===================================================================================== reading arrays
def _npz_headers(zf, path, what):
    """{key: (zip member, shape, dtype, Fortran order, data offset)} from the ``.npy`` headers of an open
    ``.npz`` alone: no array data is read, nothing is unpickled."""
    headers = {}
    for info in zf.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else None
        if key is None or key in headers:
            raise InvalidModelFile(f"{path}: {what} holds {info.filename!r}, not one .npy array per key")
        _checked_size(info, path)
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise InvalidModelFile(f"{path}: {what} array {key!r} has .npy format version {version}")
            offset = f.tell()
        if dtype.kind != "f":
            raise InvalidModelFile(f"{path}: {what} array {key!r} has dtype {dtype}, not float")
        if offset + math.prod(shape) * dtype.itemsize != info.file_size:
            raise InvalidModelFile(f"{path}: {what} array {key!r} declares shape {shape} of {dtype}, which is "
                                   f"not what its {info.file_size:,} bytes hold")
        headers[key] = (info, shape, dtype, fortran, offset)
    return headers


def _npz_array(zf, entry, path, what, key):
    """One array of an .npz (its header already checked by ``_npz_headers``) as float32, refused if any
    value is not finite once float32."""
    info, shape, dtype, fortran, offset = entry
    with zf.open(info) as f:
        f.read(offset)
        data = f.read(info.file_size - offset)
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, refused just below
        value = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C").astype(np.float32)
    if not np.isfinite(value).all():
        raise InvalidModelFile(f"{path}: {what} {key} contains NaN or infinity (as float32)")
    return value


def _set_weights_from_npz(model, data, path):
    """Load the weights of an .npz written by ``_weight_arrays`` into ``model``; returns the model's slots
    (``_weight_slots``) in the file's order.

    The keys name each weight's layer: when they are this model's names (each once), each array goes to the weight of
    its name, whatever the file's order. Otherwise (another instance of the architecture, whose layers got other
    names) they go by position: in Keras's order for a file that says so (``KERAS_ORDER``), in the order the layers
    were called for a file of an earlier gpucnn version, which numbered a functional model's weights that way."""
    slots = model._weight_slots()
    expected = [(layer, name, tuple(w.shape)) for layer in model._all_layers()
                for name, w in zip(layer.weight_names, layer.weights)]
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        headers = _npz_headers(zf, path, "weights")
        keras_order = headers.pop(KERAS_ORDER, None) is not None
        ordered = []
        for key in headers:
            index, _, rest = key.partition("_")
            if not index.isdigit() or not rest:
                raise InvalidModelFile(f"{path}: unexpected weights key {key!r} (expected like 00_conv2d_kernel)")
            ordered.append((int(index), rest, key))
        ordered.sort(key=lambda t: t[0])
        if [t[0] for t in ordered] != list(range(len(expected))):
            raise InvalidModelFile(f"{path}: the file holds {len(ordered)} weight arrays, the model has "
                                   f"{len(expected)}")
        by_name = {f"{layer.name}_{name}": k for k, (layer, name, _) in enumerate(expected)}
        if len(by_name) == len(expected) and sorted(by_name) == sorted(rest for _, rest, _ in ordered):
            place = [by_name[rest] for _, rest, _ in ordered]
        elif keras_order:
            place = list(range(len(expected)))
        else:
            slot_of = {(id(layer), i): k for k, (layer, i) in enumerate(slots)}
            place = [slot_of[(id(layer), i)] for layer in model._layers_in_call_order()
                     for i in range(len(layer.weights))]
        for (i, rest, key), k in zip(ordered, place):
            layer, name, shape = expected[k]
            if not rest.endswith("_" + name) or headers[key][1] != shape:
                raise InvalidModelFile(f"{path}: weight {i} ({rest}, shape {headers[key][1]}) does not fit "
                                       f"layer {layer.name!r}'s {name} of shape {shape}")
        values = [None] * len(expected)
        for (i, rest, key), k in zip(ordered, place):
            values[k] = _npz_array(zf, headers[key], path, "weight", f"{i} ({rest})")
    model.set_weights(values)
    return [slots[k] for k in place]


# ===================================================================================== the architecture
def layer_classes(custom_objects=None):
    """Layer classes by the names a file may give: the built-ins, the registered, then ``custom_objects``."""
    classes = dict(layers_mod.LAYER_CLASSES)
    classes.update(_registered)
    if custom_objects is None:
        return classes
    if not isinstance(custom_objects, dict):
        raise TypeError(f"custom_objects must be a dict of class names to layer classes, e.g. "
                        f"{{'MyLayer': MyLayer}}; got {type(custom_objects).__name__}")
    for name, cls in custom_objects.items():
        if name not in _schedule_classes(custom_objects):  # (learning-rate schedules are for the optimizer)
            classes[_custom_class(name, cls)] = cls
    return classes


def _custom_class(name, cls):
    if not isinstance(name, str) or not (isinstance(cls, type) and issubclass(cls, layers_mod.Layer)):
        raise TypeError(f"a custom object must be a subclass of gpucnn.layers.Layer (or of "
                        f"keras.optimizers.schedules.LearningRateSchedule) under its name; got {name!r}: {cls!r}")
    return name


class _Budget:
    """Stands in for gpucnn's random generator while a model is built from a file. Initial weights are drawn
    from a scratch generator (loading draws nothing from the user's), and a draw that would take the weights
    past ``limit`` values (what the file can hold) is refused before anything is allocated."""

    def __init__(self, limit, path):
        self._generator, self._left, self._path = np.random.default_rng(0), limit, path

    def charge(self, shape):
        """Count a weight made without this generator (a constant or seeded initializer) against the budget."""
        self._left -= math.prod(int(d) for d in shape)
        if self._left < 0:
            raise InvalidModelFile(f"{self._path}: the architecture has more weights than the file holds (a weight "
                                   f"of shape {tuple(shape)})")

    def __getattr__(self, name):
        method = getattr(self._generator, name)
        if not callable(method):
            return method

        def draw(*args, **kwargs):
            shapes = [a for a in (*args, kwargs.get("size")) if isinstance(a, (tuple, list))]
            if shapes and all(isinstance(d, (int, np.integer)) for d in shapes[-1]):
                self._left -= math.prod(int(d) for d in shapes[-1])
                if self._left < 0:
                    raise InvalidModelFile(f"{self._path}: the architecture has more weights than the file "
                                           f"holds (a weight of shape {tuple(shapes[-1])})")
            return method(*args, **kwargs)
        return draw


def _build_within(build, config, path, classes, max_params):
    """``build(config, classes, path)`` with gpucnn's random generator replaced by a budget of ``max_params``
    weights (the most the file can hold): no larger weight is ever allocated, nothing is drawn from the user's
    generator. Any error becomes InvalidModelFile."""
    try:
        with generator_in_use(_Budget(max_params, path)):
            model = build(config, classes, path)
    except InvalidModelFile:
        raise
    except _FILE_ERRORS as exc:
        raise InvalidModelFile(f"{path}: invalid model config ({type(exc).__name__}: {exc})") from None
    if model.count_params() > max_params:
        raise InvalidModelFile(f"{path}: the architecture has {model.count_params():,} weights, more than the "
                               "file holds")
    return model


def _check_savable_rate(optimizer):
    """A learning rate that a file can hold: a number or a LearningRateSchedule (whose get_config rebuilds it)."""
    schedule = None if optimizer is None else optimizer.schedule
    if schedule is not None and not isinstance(schedule, optimizers_mod.schedules.LearningRateSchedule):
        raise ValueError(f"cannot save the optimizer: its learning_rate is the function {schedule!r}, which a file "
                         "cannot hold. Use a keras.optimizers.schedules.LearningRateSchedule (a subclass with "
                         "get_config() for your own formula), or save_weights()")


def _schedule_classes(custom_objects):
    """The LearningRateSchedule subclasses registered and among ``custom_objects`` (the others are layer classes)."""
    given = {name: cls for name, cls in (custom_objects or {}).items()
             if isinstance(cls, type) and issubclass(cls, optimizers_mod.schedules.LearningRateSchedule)}
    return {**_registered_schedules, **given}


def _loss_from_config(config, path):
    """The loss a file names: its ``get_config()`` (a name, and from_logits / label_smoothing where set), or a bare
    name (files from before the options were saved)."""
    name, options = (config, {}) if isinstance(config, str) else (
        (config.get("name"), {k: v for k, v in config.items() if k != "name"}) if isinstance(config, dict)
        else (None, {}))
    if name not in losses_mod.LOSSES:
        raise InvalidModelFile(f"{path}: unknown loss {config!r}")
    if set(options) - {"from_logits", "label_smoothing"}:
        raise InvalidModelFile(f"{path}: unknown options of the loss {name!r}: {sorted(options)}")
    try:
        return losses_mod.LOSSES[name](**options)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise InvalidModelFile(f"{path}: invalid loss {config!r} ({exc})") from None


def _compile_from_config(model, header, zf, path, custom_objects=None, file_order=None):
    """Compile ``model`` as the file says and give its optimizer the saved state: flat buffers over the trained
    weights in the file's order of weights (``file_order``: the model's weight slots in that order), put back in
    the model's order."""
    try:
        cc = header["compile_config"]
        opt_name = cc["optimizer"]["name"]
        if opt_name not in optimizers_mod.OPTIMIZERS:
            raise InvalidModelFile(f"{path}: unknown optimizer {opt_name!r}")
        optimizer = optimizers_mod.OPTIMIZERS[opt_name].from_config(dict(cc["optimizer"]["config"]),
                                                                    _schedule_classes(custom_objects))
        try:
            metrics = [metrics_mod.deserialize(m) for m in cc["metrics"]]
        except (TypeError, ValueError, NotImplementedError) as exc:
            raise InvalidModelFile(f"{path}: invalid metrics {cc['metrics']!r} ({exc})") from None
        model.compile(optimizer=optimizer, loss=_loss_from_config(cc["loss"], path), metrics=metrics)
        _restore_decay_exclusions(model, optimizer, cc.get("weight_decay_exclusions"), path)
        iterations = header["optimizer_iterations"]
        if (isinstance(iterations, bool) or not isinstance(iterations, int)
                or not 0 <= iterations < optimizers_mod.MAX_ITERATIONS):
            raise InvalidModelFile(f"{path}: invalid optimizer iterations {iterations!r}")
    except InvalidModelFile:
        raise
    except _FILE_ERRORS as exc:
        raise InvalidModelFile(f"{path}: invalid compile config ({type(exc).__name__}: {exc})") from None
    optimizer.iterations = iterations
    if _OPTIMIZER in header["sha256"]:
        _restore_optimizer_state(model, optimizer, header, zf, path, opt_name, file_order)
    if [(id(layer), i) for layer, i in file_order] == [(id(layer), i) for layer, i in model._weight_slots()]:
        _restore_known(model, optimizer, header.get("optimizer_state_of"), path)  # (not in a call-order file)
    elif optimizer.iterations:
        optimizer.known.update((id(layer), i) for layer, i, *_ in model._layout)


def _restore_known(model, optimizer, listed, path):
    """Tell the loaded optimizer which weights it has a state of its own for (``listed``: their places in Keras's
    order, as saved), so that it refuses the others as the saved one would (a layer unfrozen but never trained); a
    file of an earlier version lists none: then the weights trained now, once it has stepped."""
    weights = model._weight_slots()
    trained = {(id(layer), i) for layer, i, *_ in model._layout}
    if listed is None:
        if optimizer.iterations:
            optimizer.known.update(trained)
        return
    if not (isinstance(listed, list) and all(type(k) is int and 0 <= k < len(weights) for k in listed)
            and len(set(listed)) == len(listed)):
        raise InvalidModelFile(f"{path}: invalid list of the weights the optimizer has a state for: {listed!r}")
    listed_slots = {(id(weights[k][0]), weights[k][1]) for k in listed}
    optimizer.known = set()  # what the list says, no more (a state of zeros a file holds is not the optimizer's)
    for slot in [slot for slot in optimizer.parked if slot not in listed_slots]:
        del optimizer.parked[slot]
    for k in listed:
        layer, i = weights[k]
        if (id(layer), i) in trained or (id(layer), i) in optimizer.parked:
            optimizer.known.add((id(layer), i))
        else:
            if optimizer._slots and optimizer.state is not None:
                raise InvalidModelFile(f"{path}: the optimizer has a state for weight {k} ({layer.weight_names[i]} of "
                                       f"layer {layer.name!r}), which does not train now, but the file holds none")
            optimizer.park(layer, i, {})  # (an optimizer without state buffers, plain SGD: it knows the weight)


def _restore_optimizer_state(model, optimizer, header, zf, path, opt_name, file_order):
    """The optimizer's state buffers from the file's optimizer.npz: over the weights trained now (in the file's order
    of weights, put back in the model's), and the state of weights that do not train now, set aside."""
    n = int(model._params.shape[0])
    slots = optimizer._slots
    weights = model._weight_slots()
    trained = {(id(layer), i) for layer, i, *_ in model._layout}
    frozen = {PARKED_KEY.format(k, slot): (layer, i, slot) for k, (layer, i) in enumerate(weights)
              if (id(layer), i) not in trained for slot in slots}  # what the state of a frozen weight may be saved as
    bound = [(n,)] * len(slots) + [tuple(layer.weights[i].shape) for layer, i, _ in frozen.values()]
    data = _member(zf, header, _OPTIMIZER, path, _npz_size_bound(bound))
    with zipfile.ZipFile(io.BytesIO(data)) as npz:
        headers = _npz_headers(npz, path, "optimizer state")
        kept = set(headers) - set(slots)
        if (not set(slots) <= set(headers) or any(headers[slot][1] != (n,) for slot in slots)
                or not kept <= set(frozen) or any(headers[key][1] != (frozen[key][0].weights[frozen[key][1]].size,)
                                                  for key in kept)):
            raise InvalidModelFile(f"{path}: optimizer state {sorted(headers)} does not fit a {opt_name} "
                                   f"optimizer over {n} parameters")
        state = {key: _npz_array(npz, headers[key], path, "optimizer state", key) for key in headers}
    for key, value in state.items():  # running means of squared gradients
        if key.split("_")[-1] in ("velocity", "v") and value.min(initial=0) < 0:
            raise InvalidModelFile(f"{path}: optimizer state {key} has negative values (it is a mean of squares)")
    xp = backend.ops().xp
    optimizer.build(n)
    for slot in slots:
        optimizer.state[slot][...] = xp.asarray(_in_model_order(model, state[slot], file_order))
    for key in sorted(kept):
        layer, i, name = frozen[key]
        values = optimizer.parked.get((id(layer), i), {})
        values[name] = xp.asarray(state[key])
        optimizer.park(layer, i, values)


def _restore_decay_exclusions(model, optimizer, saved, path):
    """Give the loaded optimizer the saved model's exclude_from_weight_decay (``saved``: decay_exclusions' dict, or
    None): the weights it named, by layer name and index, and its name patterns."""
    if saved is None:
        return
    names, weights = saved["var_names"], saved["weights"]
    if not (isinstance(names, list) and all(isinstance(n, str) and len(n) <= 200 for n in names)):
        raise InvalidModelFile(f"{path}: invalid weight-decay exclusions {names!r} (a list of name patterns)")
    try:
        re.compile("|".join(names))
    except re.error as exc:
        raise InvalidModelFile(f"{path}: invalid weight-decay exclusion pattern ({exc})") from None
    layers = {layer.name: layer for layer in model._all_layers()}
    var_list = []
    for entry in weights:
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in layers and type(entry[1]) is int
                and 0 <= entry[1] < len(layers[entry[0]].weights)):
            raise InvalidModelFile(f"{path}: weight-decay exclusion {entry!r} names no weight of the model")
        var_list.append(Variable(layers[entry[0]], entry[1]))
    optimizer.exclude_from_weight_decay(var_list=var_list, var_names=names)


def _in_model_order(model, flat, file_order):
    """A flat buffer over the trained weights laid out in the file's order of weights, laid out in the model's."""
    if file_order is None:
        return flat
    file_slots, file_offsets, _ = model._flat_layout(file_order)
    model_slots, model_offsets, total = model._flat_layout(model._weight_slots())
    if file_slots == model_slots:
        return flat
    where = {(id(layer), i): offset for (layer, i), offset in zip(file_slots, file_offsets)}
    out = np.zeros(total, np.float32)
    for (layer, i), offset in zip(model_slots, model_offsets):
        size = int(np.prod(layer.weights[i].shape))
        out[offset:offset + size] = flat[where[(id(layer), i)]:where[(id(layer), i)] + size]
    return out


def _restore_layer_random_states(model, states, path):
    """Give every layer with a generator of its own the state the file holds for it."""
    if states is None:  # a file from before layers' states were saved
        return
    if not isinstance(states, dict):
        raise InvalidModelFile(f"{path}: invalid layer random states")
    names = {layer.name for layer in model._all_layers() if hasattr(layer, "set_random_state")}
    unknown = sorted(set(states) - names)
    if unknown:
        raise InvalidModelFile(f"{path}: a random state for {unknown[0]!r}, which is not a layer with a "
                               "generator of its own")
    for layer in model._all_layers():
        if layer.name in names:
            try:
                layer.set_random_state(states.get(layer.name))
            except ValueError as exc:
                raise InvalidModelFile(f"{path}: invalid random state of layer {layer.name!r} ({exc})") from None


def _checked_rng_state(state, path):
    """``state`` once it is known to fit gpucnn's generator (which is not changed here)."""
    scratch = np.random.Generator(type(rng().bit_generator)())
    try:
        set_generator_state(scratch, state)
    except ValueError as exc:
        raise InvalidModelFile(f"{path}: invalid random-generator state ({exc})") from None
    return scratch.bit_generator.state


def __getattr__(name):
    from .utils import missing
    raise missing("gpucnn.saving", name, "part of keras.saving",
                  "load_model, save_model (and gpucnn's read_model, write_model, save_weights, load_weights, "
                  "register_layer_class)")

