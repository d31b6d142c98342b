"""The ``gpucnn`` command: ``gpucnn train`` trains the seed model of "Deep Learning with Python" §5.1."""
import argparse
import os
import time



def seed_model(filters=(32, 64, 64), dense=64):
    """The seed model: three 3x3 ReLU convolutions with 2x2 max-pooling between them, then Dense."""
    from . import layers, models
    f1, f2, f3 = filters
    return models.Sequential([
        layers.Conv2D(f1, (3, 3), activation="relu", input_shape=(28, 28, 1)),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(f2, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Conv2D(f3, (3, 3), activation="relu"),
        layers.Flatten(),
        layers.Dense(dense, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ])


def load_mnist(subset=None, test_subset=None):
    """MNIST as the book prepares it: (N, 28, 28, 1) float32 in [0, 1] and one-hot labels."""
    from .datasets import mnist
    from .utils import to_categorical
    (x_train, y_train), (x_test, y_test) = mnist.load_data()
    if subset:
        x_train, y_train = x_train[:subset], y_train[:subset]
    if test_subset:
        x_test, y_test = x_test[:test_subset], y_test[:test_subset]
    prep = lambda x: (x.reshape((len(x), 28, 28, 1)).astype("float32") / 255)  # noqa: E731
    return (prep(x_train), to_categorical(y_train, 10)), (prep(x_test), to_categorical(y_test, 10))


def cmd_train(args):
    from . import backend, utils
    engine = backend.set_engine(args.engine or os.environ.get("GPUCNN_DEVICE", "auto"))
    utils.set_random_seed(args.seed)
    print(f"gpucnn: training the seed model on the {engine} engine")
    (x_train, y_train), (x_test, y_test) = load_mnist(args.subset, args.test_subset)
    filters, dense = ((64, 64, 128), 128) if args.variant == "wide" else ((32, 64, 64), 64)
    model = seed_model(filters, dense)
    model.summary()
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, verbose=args.verbose)
    seconds = time.perf_counter() - start
    test_loss, test_acc = model.evaluate(x_test, y_test, verbose=args.verbose)
    print(f"training time: {seconds:.1f} s ({seconds / args.epochs:.1f} s per epoch, {engine} engine)")
    print(f"test loss: {test_loss:.4f}")
    print(f"test accuracy: {test_acc:.4f}")
    return 0


def cmd_sweep(args):
    import json

    from . import backend, sweep
    engine = backend.set_engine(args.engine or os.environ.get("GPUCNN_DEVICE", "auto"))
    quick = args.quick  # --train-size and --epochs are absent from args unless given
    train_size = getattr(args, "train_size", 500 if quick else 6000)
    epochs = getattr(args, "epochs", 1 if quick else 3)
    print(f"gpucnn: sweeping variants of the seed model on the {engine} engine")
    results = sweep.run_sweep(sweep.QUICK_VARIANTS if quick else None, train_size=train_size,
                              val_size=500 if quick else 10000, epochs=epochs, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1)
    written = [os.path.join(args.out, "sweep.json")]
    try:
        from . import viz
        png = os.path.join(args.out, "sweep.png")
        viz.plot_sweep(results, "params", hue="pooling", path=png,
                       title=f"{epochs} epochs on MNIST's first {train_size:,} training images")
        written.append(png)
    except ImportError as exc:
        print(f"no plot: {exc}")
    print("wrote " + ", ".join(written))
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="gpucnn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the seed model on MNIST and report test accuracy")
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--engine", choices=("auto", "gpu", "cpu"), default=None,
                       help="auto: the GPU when usable, else NumPy (default: $GPUCNN_DEVICE or auto)")
    train.add_argument("--subset", type=int, default=None, metavar="N",
                       help="train on the first N training images only")
    train.add_argument("--test-subset", type=int, default=None, metavar="N",
                       help="evaluate on the first N test images only")
    train.add_argument("--variant", choices=("seed", "wide"), default="seed",
                       help="seed: 32/64/64 filters + Dense(64); wide: 64/64/128 + Dense(128)")
    train.add_argument("--seed", type=int, default=1,
                       help="random seed (runs repeat exactly; README lists test accuracy for seeds 0-3)")
    train.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1)
    train.set_defaults(func=cmd_train)

    sw = sub.add_parser("sweep", help="train variants of the seed model on a small training set and "
                                      "compare their validation accuracy (table, JSON and plot)")
    sw.add_argument("--train-size", type=int, default=argparse.SUPPRESS, metavar="N",
                    help="train on the first N training images (default 6000; 500 with --quick)")
    sw.add_argument("--epochs", type=int, default=argparse.SUPPRESS,
                    help="epochs per variant (default 3; 1 with --quick)")
    sw.add_argument("--out", default="gpucnn-sweep", metavar="DIR",
                    help="folder for sweep.json and sweep.png (default: gpucnn-sweep)")
    sw.add_argument("--quick", action="store_true",
                    help="a tiny run: 3 variants, 500 training and 500 validation images, 1 epoch")
    sw.add_argument("--engine", choices=("auto", "gpu", "cpu"), default=None,
                    help="as for train (default: $GPUCNN_DEVICE or auto)")
    sw.add_argument("--seed", type=int, default=0, help="random seed (runs repeat exactly)")
    sw.set_defaults(func=cmd_sweep)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "epochs", 1) < 1 or getattr(args, "batch_size", 1) < 1:
        build_parser().error("--epochs and --batch-size must be positive")
    return args.func(args)
