"""Fashion-MNIST (Zalando's clothing images), with the same API as ``keras.datasets.fashion_mnist``.

``load_data()`` returns ``((x_train, y_train), (x_test, y_test))``: uint8 arrays of shapes
(60000, 28, 28), (60000,), (10000, 28, 28), (10000,), labels 0-9:

    0 T-shirt/top  1 Trouser  2 Pullover  3 Dress  4 Coat  5 Sandal  6 Shirt  7 Sneaker  8 Bag  9 Ankle boot

The four gzipped IDX files are the ones Keras downloads (its mirror first, then Zalando's original
site, which publishes the same files). Each is checked against its published sha256 on every load and
cached at ``$GPUCNN_HOME/datasets/fashion-mnist/`` (see ``gpucnn.datasets._download``); the first load
needs network access.
"""

import gzip
import struct
import zlib

import numpy as np

from ._download import Remote, fetch

__all__ = ["load_data"]

_SUBDIR = "fashion-mnist"
_BASE_URLS = ("https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
              "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
# name: (published sha256, size in bytes)
_FILES = {
    "train-labels-idx1-ubyte.gz": ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515),
    "train-images-idx3-ubyte.gz": ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880),
    "t10k-labels-idx1-ubyte.gz": ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148),
    "t10k-images-idx3-ubyte.gz": ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102),
}
_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes


def _remote(name):
    sha256, size = _FILES[name]
    return Remote(name, tuple(base + name for base in _BASE_URLS), sha256, size)


def read_idx(gz_bytes, ndim, name):
    """The uint8 array of a gzipped IDX file of ``ndim`` dimensions (big-endian header: two zero bytes,
    the type code 0x08, the number of dimensions, then each dimension as a 4-byte count)."""
    try:
        raw = gzip.decompress(gz_bytes)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{name} is not a gzip file ({e})") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, _IDX_UBYTE, ndim]):
        raise ValueError(f"{name} is not an IDX file of {ndim}-d unsigned bytes")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + int(np.prod(shape)):
        raise ValueError(f"{name} holds {len(raw) - header} bytes of data, its header says {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def _split(prefix):
    y = read_idx(fetch(_remote(f"{prefix}-labels-idx1-ubyte.gz"), _SUBDIR), 1, f"{prefix} labels")
    x = read_idx(fetch(_remote(f"{prefix}-images-idx3-ubyte.gz"), _SUBDIR), 3, f"{prefix} images")
    if len(x) != len(y) or x.shape[1:] != (28, 28) or (y.size and y.max() > 9):
        raise ValueError(f"the {prefix} files are not Fashion-MNIST: images {x.shape}, {len(y)} labels")
    return x, y


def load_data():
    """Load Fashion-MNIST as ``((x_train, y_train), (x_test, y_test))`` uint8 arrays."""
    return _split("train"), _split("t10k")
