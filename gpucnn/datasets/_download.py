"""Download a published data file once, verify it, and keep it in gpucnn's cache.

Every file is named by a :class:`Remote`: its file name, the URLs it is published at (tried in order),
its published sha256 and size. :func:`fetch` returns the file's bytes after checking them against that
sha256, every time: a cached copy that fails the check (a flipped byte, a truncated copy) is reported
and downloaded again.

- The cache is ``$GPUCNN_HOME/datasets/<subdir>/<name>`` (``~/.gpucnn`` when ``GPUCNN_HOME`` is unset).
- A download streams into a fresh temporary folder (removed afterwards, whatever happens), is checked
  against the published size and sha256, and only then enters the cache, atomically
  (:func:`gpucnn.utils.atomic_write`): an interrupted or wrong download never leaves a cache file.
- Network reads time out after ``TIMEOUT_S`` seconds of silence; without network the error says which
  URLs failed and why, and where a copy of the file may be placed by hand.
"""

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..utils import atomic_write

__all__ = ["DownloadError", "Remote", "cache_dir", "fetch"]

TIMEOUT_S = 30  # seconds a connection or a read may stay silent
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A data file could not be obtained from any of its URLs."""


@dataclass(frozen=True)
class Remote:
    """A published file: ``name`` in the cache, the ``urls`` serving it, its ``sha256`` and ``size``."""

    name: str
    urls: tuple
    sha256: str
    size: int


def cache_dir(subdir=""):
    """``$GPUCNN_HOME/datasets/<subdir>``, or ``~/.gpucnn/datasets/<subdir>``."""
    home = Path(os.environ.get("GPUCNN_HOME") or "~/.gpucnn").expanduser()
    return home / "datasets" / subdir


def fetch(remote, subdir=""):
    """The bytes of ``remote``, verified against its sha256: from the cache, else downloaded into it."""
    file = cache_dir(subdir) / remote.name
    if file.is_file():
        data = file.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest == remote.sha256:
            return data
        print(f"gpucnn: the cached {file} is corrupt (sha256 {digest[:16]}..., not the published "
              f"{remote.sha256[:16]}...); downloading it again")
    return _download(remote, file)


def _download(remote, file):
    """Try each URL of ``remote`` in turn; cache and return the first copy that passes the checks."""
    failures = []
    with tempfile.TemporaryDirectory(prefix="gpucnn-download-") as tmp:
        part = Path(tmp) / remote.name
        for url in remote.urls:
            try:
                digest = _stream(url, part, remote.size)
            except (OSError, ValueError, http.client.HTTPException) as e:  # URLError and timeouts are OSErrors
                failures.append(f"{url}: {_reason(e)}")
                continue
            if digest != remote.sha256:
                failures.append(f"{url}: sha256 {digest} is not the published {remote.sha256}")
                continue
            file.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "rb") as src, atomic_write(file) as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
            print(f"gpucnn: {remote.name} verified (sha256) and cached at {file}")
            return part.read_bytes()
    raise DownloadError(
        f"could not download {remote.name}:\n  " + "\n  ".join(failures) +
        f"\nThe data sets are downloaded once, which needs network access. Without it, place a copy of "
        f"{remote.name} (sha256 {remote.sha256}) at {file}.")


def _stream(url, dest, size):
    """Download ``url`` into ``dest``, refusing anything but exactly ``size`` bytes; return its sha256."""
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ValueError("only http and https URLs are fetched")
    print(f"Downloading data from {url}")
    request = urllib.request.Request(url, headers={"User-Agent": "gpucnn"})
    digest, total = hashlib.sha256(), 0
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(dest, "wb") as out:
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.isdigit() and int(announced) != size:
            raise ValueError(f"the server announces {announced} bytes, the published file has {size}")
        while True:
            chunk = response.read(min(_CHUNK, size + 1 - total))  # one byte past `size` shows an oversize
            if not chunk:
                break
            total += len(chunk)
            if total > size:
                raise ValueError(f"the server sent more than the published {size} bytes")
            digest.update(chunk)
            out.write(chunk)
    if total != size:
        raise ValueError(f"the download stopped after {total} of {size} bytes")
    return digest.hexdigest()


def _reason(exc):
    if isinstance(exc, urllib.error.HTTPError):
        return str(exc)  # "HTTP Error 404: Not Found"
    reason = getattr(exc, "reason", None)  # URLError wraps the socket error
    text = str(reason if reason is not None else exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"
