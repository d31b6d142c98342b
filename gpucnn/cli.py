"""The ``gpucnn`` command: ``gpucnn train`` trains the seed model of "Deep Learning with Python" §5.1,
``gpucnn sweep`` compares variants of it."""
import argparse
import os
import sys
import time

from .examples import load_mnist, seed_model  # noqa: F401  (gpucnn.cli.seed_model, as before)

DESCRIPTION = ('The gpucnn command: "gpucnn train" trains the seed convnet of "Deep Learning with Python" '
               '(5.1) on MNIST and reports its test accuracy; "gpucnn sweep" compares variants of it.')


def choose_engine(args):
    """The engine ``--engine`` (else $GPUCNN_DEVICE) asks for; a clear message, no traceback, when it
    cannot be had."""
    from . import backend
    try:
        return backend.set_engine(args.engine or os.environ.get("GPUCNN_DEVICE", "auto"))
    except (backend.GPUUnavailableError, ValueError) as exc:
        raise SystemExit(f"gpucnn: {exc}") from None


def count(n, word):
    """``1 epoch``, ``3 epochs``, ``6,000 images``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def cmd_train(args):
    from . import utils
    engine = choose_engine(args)
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

    from . import sweep
    engine = choose_engine(args)
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
                       title=f"{count(epochs, 'epoch')} on MNIST's first {count(train_size, 'training image')}")
        written.append(png)
    except ImportError as exc:
        print(f"no plot: {exc}")
    print("wrote " + ", ".join(written))
    return 0


def positive_int(text):
    """argparse type: an int of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


ENGINE_HELP = ("auto: the GPU when one is usable, else NumPy; gpu: the GPU, or an error saying why not; "
               "cpu: NumPy (default: $GPUCNN_DEVICE, else auto)")


def build_parser():
    parser = argparse.ArgumentParser(prog="gpucnn", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sweep}")
    train = sub.add_parser("train", help="train the seed model on MNIST and report its test accuracy",
                           description="Train the seed model on MNIST (RMSprop) and report its test accuracy.")
    train.add_argument("--epochs", type=positive_int, default=5, metavar="N",
                       help="passes over the training images (default: 5)")
    train.add_argument("--batch-size", type=positive_int, default=64, metavar="N",
                       help="images per training step (default: 64)")
    train.add_argument("--engine", choices=("auto", "gpu", "cpu"), default=None, help=ENGINE_HELP)
    train.add_argument("--subset", type=positive_int, default=None, metavar="N",
                       help="train on the first N training images only (default: all 60,000)")
    train.add_argument("--test-subset", type=positive_int, default=None, metavar="N",
                       help="evaluate on the first N test images only (default: all 10,000)")
    train.add_argument("--variant", choices=("seed", "wide"), default="seed",
                       help="seed: 32/64/64 filters and Dense(64); wide: 64/64/128 and Dense(128) "
                            "(default: seed)")
    train.add_argument("--seed", type=int, default=1,
                       help="random seed: runs with the same seed repeat exactly; the README lists the test "
                            "accuracy of seeds 0-3 (default: 1)")
    train.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1,
                       help="0: silent; 1: a progress bar; 2: one line per epoch (default: 1)")
    train.set_defaults(func=cmd_train)

    sw = sub.add_parser("sweep", help="train variants of the seed model on a small training set and "
                                      "compare their validation accuracy (table, JSON and plot)",
                        description="Train variants of the seed model from the same seed and compare "
                                    "their validation accuracy: a table, sweep.json and sweep.png.")
    sw.add_argument("--train-size", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                    help="train on the first N training images (default: 6000; 500 with --quick)")
    sw.add_argument("--epochs", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                    help="epochs per variant (default: 3; 1 with --quick)")
    sw.add_argument("--out", default="gpucnn-sweep", metavar="DIR",
                    help="folder for sweep.json and sweep.png (default: gpucnn-sweep)")
    sw.add_argument("--quick", action="store_true",
                    help="a tiny run: 3 variants, 500 training and 500 validation images, 1 epoch")
    sw.add_argument("--engine", choices=("auto", "gpu", "cpu"), default=None, help=ENGINE_HELP)
    sw.add_argument("--seed", type=int, default=0, help="random seed: runs repeat exactly (default: 0)")
    sw.set_defaults(func=cmd_sweep)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("gpucnn: interrupted", file=sys.stderr)
        return 130
