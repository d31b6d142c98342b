"""CIFAR-10 (32x32 colour images of 10 classes), with the same API as ``keras.datasets.cifar10``.

``load_data()`` returns ``((x_train, y_train), (x_test, y_test))``: uint8 arrays of shapes
(50000, 32, 32, 3), (50000, 1), (10000, 32, 32, 3), (10000, 1), labels 0-9:

    0 airplane  1 automobile  2 bird  3 cat  4 deer  5 dog  6 frog  7 horse  8 ship  9 truck

The data is the "python version" archive Keras downloads, checked against its published sha256 on every
load and cached at ``$GPUCNN_HOME/datasets/cifar-10-python.tar.gz`` (see ``gpucnn.datasets._download``);
the first load needs network access. Nothing is extracted to disk: the six batch files are read from the
archive in memory. They are pickles (dicts written by Python 2), and are read by an unpickler that admits
only the numpy names an array needs (``gpucnn.datasets._pickle``), so a tampered file can never run
code.
"""

import io
import pickle
import tarfile

import numpy as np

from ._download import Remote, fetch
from ._pickle import NumpyOnlyUnpickler

__all__ = ["load_data"]

_REMOTE = Remote(
    "cifar-10-python.tar.gz",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
    170498071,
)
_FOLDER = "cifar-10-batches-py"
_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST = "test_batch"


def read_batch(raw, name):
    """``(images (N, 32, 32, 3) uint8, labels (N,) uint8)`` of one pickled batch file."""
    try:
        batch = NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{name}: {e}") from e
    except Exception as e:  # a damaged pickle can fail in many ways
        raise ValueError(f"{name} is not a readable pickle ({type(e).__name__}: {e})") from e
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3 * 32 * 32 or not isinstance(labels, list) or len(labels) != len(data)
            or not all(isinstance(v, int) and 0 <= v <= 9 for v in labels)):
        raise ValueError(f"{name} is not a CIFAR-10 batch (a dict of b'data', a uint8 (N, 3072) array, "
                         "and b'labels', N ints 0-9)")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # rows hold the R, G, B planes in turn
    return np.ascontiguousarray(images), np.array(labels, dtype=np.uint8)


def _read_archive(archive):
    """The six batch files of the archive's ``cifar-10-batches-py`` folder, by name."""
    wanted = {f"{_FOLDER}/{name}": name for name in _TRAIN + (_TEST,)}
    found = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar:
            if member.name in wanted and member.isfile():
                found[wanted[member.name]] = tar.extractfile(member).read()
    missing = [name for name in wanted.values() if name not in found]
    if missing:
        raise ValueError(f"{_REMOTE.name} lacks {', '.join(f'{_FOLDER}/{m}' for m in missing)}")
    return found


def load_data():
    """Load CIFAR-10 as ``((x_train, y_train), (x_test, y_test))``; labels are (N, 1) as Keras's."""
    files = _read_archive(fetch(_REMOTE))
    train = [read_batch(files[name], name) for name in _TRAIN]
    x_test, y_test = read_batch(files[_TEST], _TEST)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return (x_train, y_train.reshape(-1, 1)), (x_test, y_test.reshape(-1, 1))
