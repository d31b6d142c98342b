"""The convnet from scratch of "Deep Learning with Python" (2nd edition, chapter 8: cats vs dogs), with
``import gpucnn as keras``: images read from class folders, a data-augmentation block, Rescaling, a stack of
Conv2D/MaxPooling2D, Dropout, one sigmoid output, binary cross-entropy, a checkpoint of the best epoch, then
that checkpoint evaluated on the test folder.

    python examples/catsdogs.py                        # generated filled-vs-hollow shapes (no download)
    python examples/catsdogs.py --data cats_vs_dogs_small --image-size 180 --filters 32,64,128,256,256 --epochs 100

With ``--data`` it reads a folder holding ``train/``, ``validation/`` and ``test/``, each with one subfolder per
class (the book's ``cats_vs_dogs_small``, which you make from Kaggle's download as the book shows). Without it,
it first writes such a folder of generated images: circles and squares of random size, place and colour, filled
or hollow, the two classes (``make_shapes_folder``). It prints the summary and the test accuracy and writes the
training curves (``--plot``, default docs/images/catsdogs_history.png; needs matplotlib).
"""
import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a clone without installing
    sys.path.insert(0, str(ROOT))

import gpucnn as keras  # noqa: E402
from gpucnn import layers  # noqa: E402

CLASSES = ("filled", "hollow")


# ===================================================================================== generated images
def draw_shape(kind, size, rng):
    """One RGB Pillow image, ``size`` x ``size``: a circle or a square (side 45-80 % of the image, anywhere
    inside it) of a random bright colour on a random dark one, filled (``kind`` "filled") or drawn as an outline
    a sixth of its side thick ("hollow")."""
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(0, 90, 3))
    colour = tuple(int(v) for v in rng.integers(140, 256, 3))
    image = Image.new("RGB", (size, size), background)
    side = int(rng.uniform(0.45, 0.8) * size)
    left, top = (int(v) for v in rng.integers(0, size - side + 1, 2))
    box = (left, top, left + side - 1, top + side - 1)
    draw = ImageDraw.Draw(image)
    shape = draw.ellipse if rng.uniform() < 0.5 else draw.rectangle
    if kind == "filled":
        shape(box, fill=colour)
    else:
        shape(box, outline=colour, width=max(2, side // 6))
    return image


def make_shapes_folder(root, counts=(("train", 60), ("validation", 20), ("test", 20)), size=32, seed=0):
    """Write ``root/<split>/<filled|hollow>/<n>.png`` for each (split, images per class) in ``counts``, laid out
    as the book's cats_vs_dogs_small; returns ``root``."""
    root = pathlib.Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in counts:
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                draw_shape(kind, size, rng).save(folder / f"{i}.png")
    return root


# ===================================================================================== the book's model
def build_model(image_size=180, filters=(32, 64, 128, 256, 256)):
    """The book's convnet with augmentation: a MaxPooling2D after every Conv2D but the last. With its defaults
    it has 991,041 parameters."""
    data_augmentation = keras.Sequential(
        [
            layers.RandomFlip("horizontal"),
            layers.RandomRotation(0.1),
            layers.RandomZoom(0.2),
        ],
        name="data_augmentation",
    )
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = data_augmentation(inputs)
    x = layers.Rescaling(1.0 / 255)(x)
    for i, n in enumerate(filters):
        x = layers.Conv2D(filters=n, kernel_size=3, activation="relu")(x)
        if i < len(filters) - 1:
            x = layers.MaxPooling2D(pool_size=2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs=inputs, outputs=outputs)
    model.compile(loss="binary_crossentropy", optimizer="rmsprop", metrics=["accuracy"])
    return model


def run(base_dir, image_size, filters, epochs, checkpoint, batch_size=32, verbose=2):
    """The chapter's training: returns (history, test loss, test accuracy) of the best checkpoint."""
    base_dir = pathlib.Path(base_dir)
    train_dataset = keras.utils.image_dataset_from_directory(
        base_dir / "train", image_size=(image_size, image_size), batch_size=batch_size)
    validation_dataset = keras.utils.image_dataset_from_directory(
        base_dir / "validation", image_size=(image_size, image_size), batch_size=batch_size)
    test_dataset = keras.utils.image_dataset_from_directory(
        base_dir / "test", image_size=(image_size, image_size), batch_size=batch_size)
    model = build_model(image_size, filters)
    if verbose:
        model.summary()
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            filepath=str(checkpoint),
            save_best_only=True,
            monitor="val_loss")
    ]
    history = model.fit(
        train_dataset,
        epochs=epochs,
        validation_data=validation_dataset,
        callbacks=callbacks,
        verbose=verbose)
    test_model = keras.models.load_model(checkpoint)
    test_loss, test_acc = test_model.evaluate(test_dataset, verbose=0)
    return history, test_loss, test_acc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="a folder with train/, validation/ and test/ class folders (default: "
                                       "generate filled and hollow shapes)")
    parser.add_argument("--image-size", type=int, default=48, help="images are resized to this square (default 48)")
    parser.add_argument("--filters", default="32,64,128", help="filters of each Conv2D (default 32,64,128; the "
                                                               "book's at 180: 32,64,128,256,256)")
    parser.add_argument("--per-class", type=int, default=200, help="generated training images per class "
                                                                   "(half as many for validation and for test)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "images" / "catsdogs_history.png"))
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    filters = tuple(int(f) for f in args.filters.split(","))
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data
        if data is None:
            half = max(1, args.per_class // 2)
            data = make_shapes_folder(pathlib.Path(scratch) / "shapes",
                                      (("train", args.per_class), ("validation", half), ("test", half)),
                                      size=args.image_size, seed=args.seed)
        start = time.perf_counter()
        history, test_loss, test_acc = run(data, args.image_size, filters, args.epochs,
                                           pathlib.Path(scratch) / "convnet_from_scratch_with_augmentation.keras")
        seconds = time.perf_counter() - start
    print(f"Test accuracy: {test_acc:.3f} (loss {test_loss:.4f}); trained in {seconds:.0f} s on the "
          f"{keras.engine()} engine")
    if args.plot:
        from gpucnn import viz

        viz.plot_history(history, args.plot)
        print(f"training curves: {args.plot}")


if __name__ == "__main__":
    main()
