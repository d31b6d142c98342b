"""Image decoding throughput of ``image_dataset_from_directory`` (images per second), so that data loading
is visibly not what limits training on folders of images (the cats-vs-dogs chapter).

Data: ``IMAGES`` JPEG photos-like images (smooth colour fields plus noise, 300-500 x 250-400 pixels, as
the Kaggle cats-vs-dogs images are) written once to a temporary folder; each is decoded by Pillow and
resized to 180x180 (bilinear, as the book's ``image_size=(180, 180)``), in batches of 32.

Measured, after a warm-up pass (files in the page cache):
  * ``dataset_default``: one pass over the dataset with its default decoding threads (up to 4);
  * ``dataset_one_thread``: the same with one decoding thread;
  * ``pillow_only``: Pillow's decode alone, one thread (``Image.open(...).convert("RGB")``), the floor.

Checks first that a batch equals ``load_image`` of its files. Writes benchmarks/results/image-decoding.json.
"""
import os
import tempfile
import time

import numpy as np
import pytest

from bench_utils import QUICK, write_result

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from gpucnn.data import image_dataset_from_directory  # noqa: E402
from gpucnn.data.images import load_image  # noqa: E402

IMAGES = 128 if QUICK else 512
SIZE = (180, 180)
BATCH = 32


def _write_images(root, count):
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = int(rng.integers(300, 500)), int(rng.integers(250, 400))
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = rng.random(3) * 255
        field = np.stack([base[c] * (0.5 + 0.5 * np.sin(6 * (xx + c) * (yy + 0.3))) for c in range(3)], -1)
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        folder = os.path.join(root, "cats" if i % 2 else "dogs")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.jpg"), quality=90)


def _timed_pass(dataset):
    start = time.perf_counter()
    count = sum(len(x) for x, _ in dataset)
    return count / (time.perf_counter() - start)


def test_image_decoding(benchmark):
    results = {}

    def measure():
        with tempfile.TemporaryDirectory(prefix="gpucnn-bench-images-") as root:
            _write_images(root, IMAGES)
            ds = image_dataset_from_directory(root, image_size=SIZE, batch_size=BATCH, shuffle=False,
                                              verbose=False)
            x, _ = next(iter(ds))
            for k in (0, len(x) - 1):  # correctness first
                np.testing.assert_allclose(x[k], load_image(ds.file_paths[k], SIZE), rtol=0, atol=1e-4)
            _timed_pass(ds)  # warm-up: the files enter the page cache
            results["dataset_default"] = _timed_pass(ds)
            results["workers_default"] = ds.workers
            ds.workers = 1
            results["dataset_one_thread"] = _timed_pass(ds)
            start = time.perf_counter()
            for path in ds.file_paths:
                with Image.open(path) as img:
                    img.convert("RGB").load()
            results["pillow_only"] = len(ds.file_paths) / (time.perf_counter() - start)

    benchmark.pedantic(measure, rounds=1, iterations=1)
    payload = {"images": IMAGES, "image_size": list(SIZE), "batch_size": BATCH,
               "images_per_second": {k: round(v, 1) for k, v in results.items() if k != "workers_default"},
               "workers_default": results["workers_default"]}
    write_result("image-decoding", payload)
    benchmark.extra_info.update(payload)
    print(f"\nimage decoding, {IMAGES} JPEGs -> {SIZE}: " +
          ", ".join(f"{k} {v:.0f} images/s" for k, v in payload["images_per_second"].items()))
