"""Make the README's pictures from a real run: train the seed model on MNIST, look inside it, run a sweep.

    python docs/make_pictures.py                  # about 10 minutes on the NumPy engine (2 cores)
    python docs/make_pictures.py --epochs 1 --sweep-epochs 1 --sweep-train-size 2000   # a faster look

The seed model trains on MNIST's first 50,000 training images and validates on the last 10,000; the
confusion matrix and the errors are on the 10,000 test images. The trained model, its history and the
sweep's results are kept in ``--cache`` (a later run re-plots from them; ``--retrain`` starts over).
"""
import argparse
import json
import os
import time

from gpucnn import backend, utils, viz
from gpucnn.cli import load_mnist, seed_model
from gpucnn.models import load_model
from gpucnn.sweep import format_table, run_sweep


def train_seed_model(epochs, cache):
    """Train (or reload) the seed model; return it with its history dict."""
    model_path, history_path = os.path.join(cache, "seed.gpucnn"), os.path.join(cache, "history.json")
    if os.path.exists(model_path) and os.path.exists(history_path):
        print(f"reusing {model_path}")
        with open(history_path) as f:
            return load_model(model_path), json.load(f)
    (x, y), _ = load_mnist()
    utils.set_random_seed(0)
    model = seed_model()
    model.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    history = model.fit(x[:50000], y[:50000], epochs=epochs, batch_size=64, verbose=2,
                        validation_data=(x[50000:], y[50000:]))
    print(f"trained in {time.perf_counter() - start:.0f} s on the {backend.engine()} engine")
    model.save(model_path)
    with open(history_path, "w") as f:
        json.dump(history.history, f)
    return model, history.history


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs for the seed model (default 3)")
    parser.add_argument("--sweep-epochs", type=int, default=3)
    parser.add_argument("--sweep-train-size", type=int, default=6000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "images"))
    parser.add_argument("--cache", default=os.path.join("build", "docs-cache"))
    parser.add_argument("--retrain", action="store_true", help="ignore the cache")
    args = parser.parse_args()
    backend.set_engine(os.environ.get("GPUCNN_DEVICE", "auto"))
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.cache, exist_ok=True)
    if args.retrain:
        for name in ("seed.gpucnn", "history.json", "sweep.json"):
            if os.path.exists(os.path.join(args.cache, name)):
                os.remove(os.path.join(args.cache, name))
    out = lambda name: os.path.join(args.out, name)  # noqa: E731

    model, history = train_seed_model(args.epochs, args.cache)
    _, (x_test, y_test) = load_mnist()
    loss, acc = model.evaluate(x_test, y_test, verbose=0)
    print(f"test accuracy {acc:.4f}, test loss {loss:.4f}")
    viz.plot_history(history, path=out("history.png"))
    viz.plot_filters(model, path=out("filters.png"))
    viz.plot_feature_maps(model, x_test[0], path=out("feature_maps.png"))
    probs = model.predict(x_test, verbose=0)
    viz.plot_confusion_matrix(probs, None, y_test, path=out("confusion_matrix.png"))
    viz.plot_most_confident_errors(model, x_test, y_test, n=16, path=out("confident_errors.png"))

    sweep_path = os.path.join(args.cache, "sweep.json")
    if os.path.exists(sweep_path):
        with open(sweep_path) as f:
            results = json.load(f)
        print(format_table(results))
    else:
        results = run_sweep(train_size=args.sweep_train_size, epochs=args.sweep_epochs)
        with open(sweep_path, "w") as f:
            json.dump(results, f, indent=1)
    viz.plot_sweep(results, "params", hue="pooling", path=out("sweep.png"),
                   title=f"{args.sweep_epochs} epochs on MNIST's first {args.sweep_train_size:,} training "
                         "images; validation on its last 10,000")
    print(f"pictures in {args.out}")


if __name__ == "__main__":
    main()
