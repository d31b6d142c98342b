"""End to end: real MNIST through the book's code, the `gpucnn` command, and the installed package."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gpucnn import backend, layers, models, utils

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.mnist
def test_book_code_on_an_mnist_subset_reaches_the_stated_accuracy():
    """§5.1's code, verbatim but for the imports, on 6,000 images for 3 epochs: ≥ 0.94 on 2,000 tests."""
    from gpucnn.datasets import mnist
    from gpucnn.utils import to_categorical
    backend.set_engine("cpu")
    utils.set_random_seed(0)
    (train_images, train_labels), (test_images, test_labels) = mnist.load_data()
    train_images = train_images[:6000].reshape((6000, 28, 28, 1)).astype("float32") / 255
    test_images = test_images[:2000].reshape((2000, 28, 28, 1)).astype("float32") / 255
    train_labels = to_categorical(train_labels[:6000])
    test_labels = to_categorical(test_labels[:2000])

    model = models.Sequential()
    model.add(layers.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1)))
    model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Conv2D(64, (3, 3), activation="relu"))
    model.add(layers.MaxPooling2D((2, 2)))
    model.add(layers.Conv2D(64, (3, 3), activation="relu"))
    model.add(layers.Flatten())
    model.add(layers.Dense(64, activation="relu"))
    model.add(layers.Dense(10, activation="softmax"))
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(train_images, train_labels, epochs=3, batch_size=64, verbose=0)
    test_loss, test_acc = model.evaluate(test_images, test_labels, verbose=0)
    assert history.history["loss"][1] < history.history["loss"][0]
    print("test accuracy", test_acc)
    assert test_acc >= 0.94, test_acc
    assert test_loss < 0.2


@pytest.mark.mnist
def test_train_command_prints_summary_progress_and_accuracy():
    out = subprocess.run(
        [sys.executable, "-m", "gpucnn", "train", "--engine", "cpu", "--subset", "1280",
         "--test-subset", "500", "--epochs", "2"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=True).stdout
    assert "Total params: 93,322 (364.54 KB)" in out
    assert "Epoch 2/2" in out and "20/20 ━━━━━━━━━━━━━━━━━━━━" in out
    accuracy = float(out.strip().splitlines()[-1].split("test accuracy:")[1])
    assert 0.6 < accuracy <= 1


def test_a_built_wheel_ships_the_kernels(tmp_path):
    """A non-editable install must find kernels/*.cu inside the package (as gpucnn.kernels)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, timeout=300)
    wheel = next(tmp_path.glob("gpucnn-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    assert sources and all(f"gpucnn/kernels/{name}" in names for name in sources)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(wheel)], check=True, timeout=300)
    found = subprocess.run(
        [sys.executable, "-c", "import gpucnn, gpucnn.engines.cuda_loader as c; print(gpucnn.__file__); "
                               "print(sorted(p.name for p in c.kernel_dir().iterdir()))"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env={"PYTHONPATH": str(site)}).stdout
    package_file, listing = found.splitlines()
    assert package_file.startswith(str(site))
    assert all(name in listing for name in sources)
