"""Small utilities a Keras user expects: ``to_categorical``, ``set_random_seed``, ``clear_session``."""
import contextlib
import os
import random
import signal
import tempfile
import threading

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
def atomic_write(path):
    """Yield a binary file that replaces ``path`` only once completely written and synced to disk."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
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


@contextlib.contextmanager
def sigint_deferred():
    """Hold back Ctrl-C (SIGINT) for the duration of the block, then deliver it to the handler that was in
    place (by default: raise KeyboardInterrupt) as soon as the block ends. Only the main thread receives
    signals; elsewhere, or when the handler was not set from Python, the block runs as is."""
    pending = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGINT)
    if previous is None:
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            signal.raise_signal(signal.SIGINT)
