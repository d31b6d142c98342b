"""fashion_mnist and cifar10: the real download code against a local HTTP server (127.0.0.1 only).

The server serves small files the tests build in the published formats (gzipped IDX files; a tar.gz of
Python-2 pickles), and the modules' expected sha256 and sizes are patched to those files'.
"""

import gzip
import hashlib
import http.server
import io
import pickle
import re
import struct
import tarfile
import tempfile
import threading

import numpy as np
import pytest

from gpucnn.datasets import _download, cifar10, fashion_mnist


# ------------------------------------------------------------------------------------------ the server
class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        srv = self.server
        srv.hits.append(self.path)
        behaviour = srv.routes.get(self.path)
        if behaviour is None:
            self.send_error(404)
            return
        body, how = behaviour
        if how == "slow":
            srv.release.wait(5)  # longer than the patched timeout; released at teardown
            return
        self.send_response(200)
        if how != "oversize":  # without a length the body ends when the connection closes (HTTP/1.0)
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if how == "truncate" else body)

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server():
    """A threaded HTTP server on 127.0.0.1 (a free port), shut down at teardown or after 60 s anyway."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads, srv.block_on_close = True, False
    srv.routes, srv.hits, srv.release = {}, [], threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    deadline = threading.Timer(60, srv.shutdown)
    deadline.daemon = True
    deadline.start()
    yield srv
    deadline.cancel()
    srv.release.set()
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """GPUCNN_HOME and the temporary-file folder both inside tmp_path; short timeouts."""
    monkeypatch.setenv("GPUCNN_HOME", str(tmp_path / "home"))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(_download, "TIMEOUT_S", 0.5)
    return tmp_path


def _leftovers(root):
    """Temporary download folders and half-written cache files anywhere under ``root``."""
    return [p for p in root.rglob("*") if p.name.startswith("gpucnn-download-") or p.suffix == ".tmp"]


# ------------------------------------------------------------------------------------------ Fashion-MNIST
def _idx_gz(array):
    """A gzipped IDX file as Zalando and Keras publish them: magic 2049 (labels) or 2051 (images)."""
    magic = {1: 2049, 3: 2051}[array.ndim]
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion(server, home, monkeypatch):
    """Serve four small Fashion-MNIST files at Keras's path; patch the module's URLs and hashes."""
    rng = np.random.default_rng(1)
    arrays = {"train": (rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)),
              "t10k": (rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3))}
    files = {}
    for prefix, (x, y) in arrays.items():
        files[f"{prefix}-images-idx3-ubyte.gz"] = _idx_gz(x)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = _idx_gz(y)
    for name, body in files.items():
        server.routes[f"/tf-keras-datasets/{name}"] = (body, "ok")
    monkeypatch.setattr(fashion_mnist, "_BASE_URLS", (server.url + "/tf-keras-datasets/",))
    monkeypatch.setattr(fashion_mnist, "_FILES",
                        {n: (hashlib.sha256(b).hexdigest(), len(b)) for n, b in files.items()})
    return arrays, files


def _check_fashion(result, arrays):
    (x_train, y_train), (x_test, y_test) = result
    assert x_train.shape == (5, 28, 28) and y_train.shape == (5,)
    assert x_test.shape == (3, 28, 28) and y_test.shape == (3,)
    for got, want in ((x_train, arrays["train"][0]), (y_train, arrays["train"][1]),
                      (x_test, arrays["t10k"][0]), (y_test, arrays["t10k"][1])):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


def test_fashion_mnist_downloads_verifies_and_caches(fashion, server, home, capsys):
    arrays, files = fashion
    _check_fashion(fashion_mnist.load_data(), arrays)
    assert len(server.hits) == 4
    assert "Downloading data from http://127.0.0.1" in capsys.readouterr().out
    cached = home / "home" / "datasets" / "fashion-mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(files)
    assert _leftovers(home) == []
    _check_fashion(fashion_mnist.load_data(), arrays)  # from the cache: no new request
    assert len(server.hits) == 4


def test_fashion_mnist_corrupt_cache_is_replaced(fashion, server, home, capsys):
    arrays, _ = fashion
    fashion_mnist.load_data()
    file = home / "home" / "datasets" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    capsys.readouterr()
    _check_fashion(fashion_mnist.load_data(), arrays)
    assert "train-images-idx3-ubyte.gz is corrupt" in capsys.readouterr().out
    assert server.hits.count("/tf-keras-datasets/train-images-idx3-ubyte.gz") == 2
    assert len(server.hits) == 5


def test_fashion_mnist_falls_back_to_the_second_url(fashion, server, monkeypatch):
    arrays, _ = fashion
    monkeypatch.setattr(fashion_mnist, "_BASE_URLS", (server.url + "/gone/", server.url + "/tf-keras-datasets/"))
    _check_fashion(fashion_mnist.load_data(), arrays)
    assert server.hits.count("/gone/train-labels-idx1-ubyte.gz") == 1


@pytest.mark.parametrize("how, message", [
    ("wrong", "is not the published"),
    ("truncate", r"stopped after \d+ of \d+ bytes|IncompleteRead"),
    ("oversize", "more than the published"),
    ("slow", "timed out"),
    ("missing", "HTTP Error 404"),
])
def test_fashion_mnist_bad_downloads_fail_clearly_and_leave_nothing(fashion, server, home, how, message):
    _, files = fashion
    route = "/tf-keras-datasets/train-labels-idx1-ubyte.gz"
    body = files["train-labels-idx1-ubyte.gz"]
    if how == "wrong":  # same size, one byte different
        server.routes[route] = (body[:-1] + bytes([body[-1] ^ 1]), "ok")
    elif how == "missing":
        del server.routes[route]
    elif how == "oversize":
        server.routes[route] = (body + b"0123456789", "oversize")
    else:
        server.routes[route] = (body, how)
    with pytest.raises(_download.DownloadError) as info:
        fashion_mnist.load_data()
    text = str(info.value)
    assert re.search(message, text) and "network access" in text and "train-labels-idx1-ubyte.gz" in text
    assert not (home / "home" / "datasets" / "fashion-mnist" / "train-labels-idx1-ubyte.gz").exists()
    assert _leftovers(home) == []


def test_no_network_gives_a_clear_error(home, monkeypatch):
    with socket_closed_port() as port:
        monkeypatch.setattr(fashion_mnist, "_BASE_URLS", (f"http://127.0.0.1:{port}/",))
        with pytest.raises(_download.DownloadError, match="(?s)Connection refused.*needs network access"):
            fashion_mnist.load_data()
    assert _leftovers(home) == []


def socket_closed_port():
    """A context manager giving a 127.0.0.1 port that nothing listens on."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def closed():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        yield port
    return closed()


def test_idx_reader_refuses_a_wrong_header():
    good = _idx_gz(np.zeros((2, 28, 28)))
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion_mnist.read_idx(good, 1, "labels")
    with pytest.raises(ValueError, match="bytes of data"):
        fashion_mnist.read_idx(gzip.compress(gzip.decompress(good)[:-1]), 3, "images")
    with pytest.raises(ValueError, match="not a gzip file"):
        fashion_mnist.read_idx(b"plain bytes", 3, "images")


# ------------------------------------------------------------------------------------------ CIFAR-10
class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's ``str`` (BINSTRING), as the published CIFAR-10 batches are."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


def _py2_pickle(obj):
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")  # numpy 1 spelling


def _cifar_batch(rng, n, label):
    data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, n)]
    d = {"batch_label": label, "labels": labels, "data": data,
         "filenames": [f"img_{i}.png" for i in range(n)]}
    return d, data, labels


def _tar_gz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


def _planes_to_hwc(data):
    """Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major 32x32."""
    r, g, b = (data[:, k * 1024:(k + 1) * 1024].reshape(-1, 32, 32) for k in range(3))
    return np.stack([r, g, b], axis=-1)


def _serve_cifar(server, monkeypatch, batches):
    members = {f"cifar-10-batches-py/{name}": body for name, body in batches.items()}
    members["cifar-10-batches-py/batches.meta"] = _py2_pickle({"label_names": ["airplane"] * 10})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    archive = _tar_gz(members)
    server.routes["/~kriz/cifar-10-python.tar.gz"] = (archive, "ok")
    monkeypatch.setattr(cifar10, "_REMOTE", _download.Remote(
        "cifar-10-python.tar.gz", (server.url + "/~kriz/cifar-10-python.tar.gz",),
        hashlib.sha256(archive).hexdigest(), len(archive)))
    return archive


def test_cifar10_loads_in_keras_format(server, home, monkeypatch):
    rng = np.random.default_rng(2)
    batches, want_x, want_y = {}, {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d, data, labels = _cifar_batch(rng, 2 if name != "test_batch" else 3, f"batch {name}")
        batches[name] = _py2_pickle(d)
        want_x[name], want_y[name] = _planes_to_hwc(data), labels
    _serve_cifar(server, monkeypatch, batches)

    (x_train, y_train), (x_test, y_test) = cifar10.load_data()
    assert x_train.shape == (10, 32, 32, 3) and y_train.shape == (10, 1)
    assert x_test.shape == (3, 32, 32, 3) and y_test.shape == (3, 1)
    assert {a.dtype for a in (x_train, y_train, x_test, y_test)} == {np.dtype(np.uint8)}
    train_names = [f"data_batch_{i}" for i in range(1, 6)]
    np.testing.assert_array_equal(x_train, np.concatenate([want_x[n] for n in train_names]))
    np.testing.assert_array_equal(y_train[:, 0], sum((want_y[n] for n in train_names), []))
    np.testing.assert_array_equal(x_test, want_x["test_batch"])
    np.testing.assert_array_equal(y_test[:, 0], want_y["test_batch"])
    assert (home / "home" / "datasets" / "cifar-10-python.tar.gz").is_file()
    assert _leftovers(home) == []
    cifar10.load_data()
    assert len(server.hits) == 1  # the second load reads the verified cache


class _Payload:
    """Unpickling this would run ``exec``, which writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_cifar10_hostile_pickle_is_refused_and_never_runs(server, home, monkeypatch, tmp_path):
    rng = np.random.default_rng(3)
    marker = tmp_path / "payload-ran"
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d, _, _ = _cifar_batch(rng, 2, "batch")
        if name == "data_batch_3":
            d["batch_label"] = _Payload(marker)
        batches[name] = _py2_pickle(d)
    _serve_cifar(server, monkeypatch, batches)
    with pytest.raises(ValueError, match="data_batch_3: refusing to load .*exec"):
        cifar10.load_data()
    assert not marker.exists()
    # the same payload through plain pickle does run: the test's payload is real
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.read_text() == "ran"


def test_cifar10_archive_without_a_batch_or_with_a_wrong_batch_is_refused(server, home, monkeypatch):
    rng = np.random.default_rng(4)
    batches = {f"data_batch_{i}": _py2_pickle(_cifar_batch(rng, 2, "b")[0]) for i in range(1, 6)}
    _serve_cifar(server, monkeypatch, batches)
    with pytest.raises(ValueError, match="lacks cifar-10-batches-py/test_batch"):
        cifar10.load_data()
    d, _, _ = _cifar_batch(rng, 2, "b")
    d["labels"] = [3, 11]
    with pytest.raises(ValueError, match="is not a CIFAR-10 batch"):
        cifar10.read_batch(_py2_pickle(d), "test_batch")
