"""The book's next chapter (2nd edition, chapter 8: a convnet from scratch on cats vs dogs) with
``import gpucnn as keras`` on the NumPy engine: images from class folders, the data_augmentation block,
Rescaling, Conv2D/MaxPooling2D, Dropout, a sigmoid output, binary cross-entropy, ModelCheckpoint of the best
val_loss, then load_model and evaluate. The images are generated (filled vs hollow shapes, Pillow), small, and the
code is examples/catsdogs.py's, the chapter's own."""
import pathlib
import sys

import numpy as np
import pytest

pytest.importorskip("PIL", reason="image folders need Pillow (pip install -e '.[images]')")

import gpucnn as keras  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import catsdogs  # noqa: E402

pytestmark = pytest.mark.usefixtures("numpy_engine")

# Keras 3.15's summary of the book's model at 180x180x3 (torch backend, 80 columns), from its title's next line
KERAS_BOOK_SUMMARY = """\
┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━┓
┃ Layer (type)                    ┃ Output Shape           ┃       Param # ┃
┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━┩
│ input_layer (InputLayer)        │ (None, 180, 180, 3)    │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ data_augmentation (Sequential)  │ (None, 180, 180, 3)    │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ rescaling (Rescaling)           │ (None, 180, 180, 3)    │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ conv2d (Conv2D)                 │ (None, 178, 178, 32)   │           896 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ max_pooling2d (MaxPooling2D)    │ (None, 89, 89, 32)     │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ conv2d_1 (Conv2D)               │ (None, 87, 87, 64)     │        18,496 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ max_pooling2d_1 (MaxPooling2D)  │ (None, 43, 43, 64)     │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ conv2d_2 (Conv2D)               │ (None, 41, 41, 128)    │        73,856 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ max_pooling2d_2 (MaxPooling2D)  │ (None, 20, 20, 128)    │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ conv2d_3 (Conv2D)               │ (None, 18, 18, 256)    │       295,168 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ max_pooling2d_3 (MaxPooling2D)  │ (None, 9, 9, 256)      │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ conv2d_4 (Conv2D)               │ (None, 7, 7, 256)      │       590,080 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ flatten (Flatten)               │ (None, 12544)          │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ dropout (Dropout)               │ (None, 12544)          │             0 │
├─────────────────────────────────┼────────────────────────┼───────────────┤
│ dense (Dense)                   │ (None, 1)              │        12,545 │
└─────────────────────────────────┴────────────────────────┴───────────────┘
 Total params: 991,041 (3.78 MB)
 Trainable params: 991,041 (3.78 MB)
 Non-trainable params: 0 (0.00 B)"""


def test_the_books_model_at_180x180_has_kerass_summary_and_991041_parameters(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    model = catsdogs.build_model()
    assert model.count_params() == 991_041
    lines = []
    model.summary(print_fn=lines.append)
    assert [line.rstrip() for line in lines[1:]] == KERAS_BOOK_SUMMARY.split("\n")
    block = model.get_layer("data_augmentation")
    assert [type(layer).__name__ for layer in block.layers] == ["RandomFlip", "RandomRotation", "RandomZoom"]


def test_the_chapter_trains_to_high_validation_accuracy_on_generated_images(tmp_path):
    base = catsdogs.make_shapes_folder(tmp_path / "shapes", (("train", 60), ("validation", 20), ("test", 20)),
                                       size=32, seed=1)
    checkpoint = tmp_path / "convnet_from_scratch_with_augmentation.keras"
    history, test_loss, test_acc = catsdogs.run(base, 32, (32, 64, 128), epochs=12, checkpoint=checkpoint,
                                                verbose=0)
    logs = history.history
    assert sorted(logs) == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert logs["loss"][-1] < logs["loss"][0]
    assert max(logs["val_accuracy"]) >= 0.9, logs
    assert test_acc >= 0.85, (test_acc, logs)
    # the checkpoint is the epoch of the lowest val_loss
    best = int(np.argmin(logs["val_loss"]))
    validation = keras.utils.image_dataset_from_directory(base / "validation", image_size=(32, 32), verbose=False)
    loss, acc = keras.models.load_model(checkpoint).evaluate(validation, verbose=0)
    np.testing.assert_allclose([loss, acc], [logs["val_loss"][best], logs["val_accuracy"][best]], rtol=1e-5)
