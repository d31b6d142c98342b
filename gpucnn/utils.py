"""Small utilities a Keras user expects: ``to_categorical``, ``set_random_seed``, ``clear_session``."""
import contextlib
import errno
import os
import random
import re
import signal
import stat
import tempfile
import threading

try:
    import fcntl
except ImportError:  # not POSIX: no locks, no cleaning of temporaries left by killed writers
    fcntl = None

import numpy as np

_state = {"rng": np.random.default_rng(), "names": {}}


def rng():
    """gpucnn's random generator: weight initialisation, shuffling and dropout seeds draw from it."""
    return _state["rng"]


def set_random_seed(seed):
    """Seed Python's ``random``, NumPy's global generator and gpucnn's own, so runs repeat exactly."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    _state["rng"] = np.random.default_rng(seed)


def next_name(base):
    """Keras's default names: the first ``conv2d``, then ``conv2d_1``, ``conv2d_2``, ..."""
    count = _state["names"].get(base, 0)
    _state["names"][base] = count + 1
    return base if count == 0 else f"{base}_{count}"


def clear_session():
    """Restart default layer and model names from ``conv2d``, ``sequential``, ... (as Keras's)."""
    _state["names"].clear()


def to_categorical(y, num_classes=None):
    """One-hot float64 rows of integer class labels, as ``keras.utils.to_categorical``.

    ``y`` of shape (N,) or (N, 1) → (N, num_classes); ``num_classes`` defaults to max(y) + 1.
    """
    y = np.asarray(y)
    if y.ndim > 1 and y.shape[-1] == 1:
        y = y.reshape(y.shape[:-1])
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError("to_categorical needs integer class labels; got non-integral floats")
        y = y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise TypeError(f"to_categorical needs integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"to_categorical: labels must be >= 0, got {int(y.min())}")
    if num_classes is None:
        num_classes = int(y.max()) + 1 if y.size else 0
    if y.size and y.max() >= num_classes:
        raise ValueError(f"to_categorical: label {int(y.max())} is out of range for num_classes={num_classes}")
    out = np.zeros(y.shape + (num_classes,), dtype=np.float64)
    np.put_along_axis(out, y[..., None], 1.0, axis=-1)
    return out


@contextlib.contextmanager
def atomic_write(path, overwrite=True):
    """Yield a binary file that replaces ``path`` only once completely written and synced to disk.

    The file is written next to the one ``path`` names, through any symbolic link (the link keeps pointing to
    the new file). A directory, FIFO or device is refused, so is a read-only file, and with
    ``overwrite=False`` any existing one. Errors name ``path``, never the temporary file; a temporary left by
    a process killed mid-write is removed by the next write (or ``remove_stale_temporaries``) of that path.
    """
    path = os.fspath(path)
    target = os.path.realpath(path)
    _check_target(path, target, overwrite)
    directory = os.path.dirname(target)
    remove_stale_temporaries(target)
    tmp = None
    try:
        fd, tmp = _locked_temporary(target)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(target))  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, path) from exc  # the target's name, not the temporary's
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _file_mode(path):
    """The existing file's permissions, or those a new file would get (0666 less the umask)."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _check_target(path, target, overwrite):
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory; give the path of a file inside it", path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "is not a regular file (a FIFO, device or socket); gpucnn writes only "
                                    "regular files", path)
    if not overwrite:
        raise FileExistsError(errno.EEXIST, "exists; pass overwrite=True to replace it", path)
    if not os.access(target, os.W_OK) or not st.st_mode & 0o222:
        raise PermissionError(errno.EACCES, "is read-only, so gpucnn does not replace it; make it writable "
                                            "(chmod u+w) or remove it first", path)


def _temporary_pattern(target):
    directory, base = os.path.split(target)
    return directory, base, re.compile(r"\." + re.escape(base) + r"\.[a-z0-9_]{8}\.tmp")  # mkstemp's names


def _locked_temporary(target):
    """A new temporary file next to ``target``, locked while this process writes it: ``(fd, path)``."""
    directory, base, _ = _temporary_pattern(target)
    while True:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + base + ".", suffix=".tmp")
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:  # not taken for stale (and removed) between its creation and the lock
            return fd, tmp
        os.close(fd)


def remove_stale_temporaries(path):
    """Remove the temporary files that ``atomic_write`` left next to ``path`` in a process that was killed
    while writing (those of a write still going on are locked, and kept). POSIX only; errors are ignored."""
    if fcntl is None:
        return
    directory, _, pattern = _temporary_pattern(os.path.realpath(os.fspath(path)))
    with contextlib.suppress(OSError):
        names = [name for name in os.listdir(directory or ".") if pattern.fullmatch(name)]
        for name in names:
            stale = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                fd = os.open(stale, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
                    os.unlink(stale)
                finally:
                    os.close(fd)


try:  # the C functions that ``signal.signal``/``getsignal`` wrap, without their enum conversions: a step defers
    import _signal as _signals  # Ctrl-C several times, and those conversions cost more than the rest of it
except ImportError:  # pragma: no cover - another Python implementation
    _signals = signal
_SIGINT = int(signal.SIGINT)


@contextlib.contextmanager
def sigint_deferred():
    """Hold back Ctrl-C (SIGINT) for the duration of the block, then deliver it to the handler that was in
    place (by default: raise KeyboardInterrupt) as soon as the block ends. Only the main thread receives
    signals; elsewhere, or when the handler was not set from Python, the block runs as is."""
    pending = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = _signals.getsignal(_SIGINT)
    if previous is None:
        yield
        return
    _signals.signal(_SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        _signals.signal(_SIGINT, previous)
        if pending:
            signal.raise_signal(signal.SIGINT)


def set_generator_state(generator, state):
    """Set NumPy ``generator``'s state to ``state``, a dict as its ``bit_generator.state`` gives (e.g. read
    back from a file). ValueError, with the generator untouched, unless ``state`` has exactly that form
    (same keys, integers where integers are, in range)."""
    bits = generator.bit_generator
    kind = type(bits).__name__
    if not _same_form(state, bits.state):
        raise ValueError(f"not a {kind} random-generator state: {str(state)[:200]}")
    scratch = type(bits)()
    try:
        scratch.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise ValueError(f"invalid {kind} random-generator state ({exc})") from None
    if scratch.state != state:
        raise ValueError(f"invalid {kind} random-generator state: {str(state)[:200]}")
    bits.state = state


def _same_form(value, template):
    if isinstance(template, dict):
        return (isinstance(value, dict) and value.keys() == template.keys()
                and all(_same_form(value[k], template[k]) for k in template))
    if isinstance(template, int):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return type(value) is type(template) and (not isinstance(template, str) or value == template)


@contextlib.contextmanager
def generator_in_use(generator):
    """gpucnn's generator (``rng()``) is ``generator`` inside the block; the usual one is back after it,
    untouched."""
    usual, _state["rng"] = _state["rng"], generator
    try:
        yield
    finally:
        _state["rng"] = usual


class EagerArray(np.ndarray):
    """A NumPy array with Keras's tensor method ``numpy()``: what a layer or model called on NumPy data returns and
    what a dataset's batches are, so the book's ``images[0].numpy()`` works. Everything else is NumPy's."""

    def numpy(self):
        """The values as a plain NumPy array (a view, no copy)."""
        return self.view(np.ndarray)

    def __repr__(self):  # printed as the NumPy array it is
        return repr(self.view(np.ndarray))

    def __array_wrap__(self, array, context=None, return_scalar=False):
        # a reduction to one value (sum, max, ...) gives NumPy's scalar, as on a plain array, not a 0-d array
        if return_scalar:
            return array[()]
        return super().__array_wrap__(array, context, return_scalar)


def eager(value):
    """``value`` with its arrays (also inside a list or tuple) as ``EagerArray``: a NumPy array viewed, a device
    (CuPy) array copied to the host, so what a layer or model called on data returns is the same kind of array on
    both engines (``numpy()``, ``np.asarray`` and Matplotlib work on it, as on a TensorFlow tensor; CuPy's arrays
    refuse all three); anything else (a number) as it is."""
    from .backend import is_engine_array  # (here: backend's import chain reaches utils)
    if is_engine_array(value):  # checked first: the emulator's stand-in device arrays are NumPy subclasses
        return value.get().view(EagerArray)
    if isinstance(value, np.ndarray):
        return value if isinstance(value, EagerArray) else value.view(EagerArray)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple
        return type(value)(*(eager(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(eager(v) for v in value)
    return value


_KERAS_UTILS = ("set_random_seed", "clear_session", "to_categorical", "image_dataset_from_directory", "load_img",
                "img_to_array", "PyDataset", "register_keras_serializable")


def plain_number(value):
    """The number one of the optimizers' live variables (``optimizer.learning_rate``, ``iterations``) holds now, for
    a check or a setting that keeps it; any other value as it is."""
    read = getattr(type(value), "_plain_number", None)
    return read(value) if read is not None else value


def missing(module, name, what, has):
    """The AttributeError for a Keras name that ``module`` lacks (a module's ``__getattr__`` raises it): it says
    gpucnn does not have that ``what`` yet and lists what it has (``has``: names, or a sentence)."""
    if name.startswith("_"):
        return AttributeError(name)
    has = has if isinstance(has, str) else ", ".join(has)
    return AttributeError(f"{module} has no {name!r}: gpucnn does not have that {what} (yet). It has: {has}")


def __getattr__(name):
    """A part of ``keras.utils`` gpucnn does not have (``plot_model``, ...): said clearly, with what it has. (Keras's
    ``keras.utils.register_keras_serializable`` is ``gpucnn.saving``'s, read here when asked for: saving imports
    this module.)"""
    if name == "register_keras_serializable":
        from .saving import register_keras_serializable
        return register_keras_serializable
    raise missing("gpucnn.utils", name, "part of keras.utils", _KERAS_UTILS)
