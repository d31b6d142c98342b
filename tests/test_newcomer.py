"""A newcomer's first hour: the installed command works from anywhere, its help says what each option means
and defaults to, a bad option or a missing GPU gives a message and no traceback, and the errors of Keras code
that gpucnn does not support yet say so instead of pointing the wrong way."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpucnn import backend, callbacks, cli, layers, losses, models, optimizers

ROOT = Path(__file__).resolve().parents[1]


def gpucnn_command(*args, cwd):
    return subprocess.run([sys.executable, "-m", "gpucnn", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


# ===================================================================================== the command
@pytest.mark.skipif(backend.gpu_status()[0], reason="a GPU is usable here")
def test_asking_for_the_gpu_without_one_prints_the_reason_and_no_traceback(tmp_path):
    run = gpucnn_command("train", "--engine", "gpu", cwd=tmp_path)  # from any folder, not just the checkout
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.startswith("gpucnn: the GPU engine was requested but is not usable")
    assert "Traceback" not in run.stderr and "--engine cpu" in run.stderr
    assert "gpucnn[" not in run.stderr  # gpucnn is not on the package index: no such install command


@pytest.mark.parametrize("option", ["--subset", "--test-subset", "--epochs", "--batch-size"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_options_that_count_must_be_positive(option, value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", option, value])
    assert e.value.code == 2
    assert f"argument {option}: must be a positive whole number, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["train"], ["sweep"]])
def test_help_says_what_each_option_means_and_its_default(command, capsys):
    with pytest.raises(SystemExit):
        cli.main(command + ["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "§" not in text
    options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    for option in options:
        block = text[text.index("  " + option):].split("\n  -", 1)[0]
        assert option in ("--help", "--quick") or "(default:" in " ".join(block.split()), block


def test_counts_read_as_english():
    assert [cli.count(n, "epoch") for n in (1, 2)] == ["1 epoch", "2 epochs"]
    assert cli.count(6000, "training image") == "6,000 training images"


def test_engine_names_agree():
    """``engine()`` says numpy or cuda; ``set_engine`` takes those names as well as cpu and gpu."""
    try:
        assert backend.set_engine("numpy") == "numpy" == backend.engine()
        assert backend.set_engine(backend.engine()) == "numpy"
        assert backend._resolve("CPU") == backend._resolve("numpy")
        with pytest.raises(ValueError, match="'gpu' \\(or 'cuda'\\), 'cpu' \\(or 'numpy'\\)"):
            backend.set_engine("tpu")
    finally:
        backend.set_engine("cpu")


@pytest.mark.slow
def test_pip_install_in_a_fresh_venv_gives_the_package_and_the_command(tmp_path):
    """``pip install .`` into a new virtual environment (NumPy and setuptools lent from this one, nothing
    from the checkout), then ``import gpucnn`` and the ``gpucnn`` command, run from another folder."""
    import setuptools

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    lent = {str(Path(module.__file__).parents[1]) for module in (np, setuptools)}
    Path(purelib, "lent.pth").write_text("\n".join(sorted(lent)) + "\n")  # plain paths: their .pth are not read
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", str(ROOT)], check=True, timeout=600, cwd=tmp_path)
    where = subprocess.run([python, "-c", "import gpucnn; print(gpucnn.__file__)"], capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout.strip()
    assert where.startswith(purelib)
    run = subprocess.run([venv / "bin" / "gpucnn", "train", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 0 and "--subset N" in run.stdout


def test_the_readme_installs_from_the_checkout_not_the_package_index():
    import re

    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"`(pip install [^`]*)`", readme)
    assert commands and all("@ git+" in c for c in commands if "gpucnn" in c)  # it is not on the index
    assert ". .venv/bin/activate" in readme and "pip install -e '.[viz]'" in readme
    assert 'make train ARGS="' in readme


# ===================================================================================== Keras code, honest errors
@pytest.mark.parametrize("cls", [losses.CategoricalCrossentropy, losses.SparseCategoricalCrossentropy])
def test_loss_objects_take_keras_arguments_and_refuse_what_they_cannot_do(cls):
    assert cls().name == cls(from_logits=False, reduction="sum_over_batch_size", name="my loss").name
    assert cls(from_logits=True).from_logits and not cls().from_logits  # the loss applies the softmax itself
    with pytest.raises(ValueError, match="got reduction='sum'"):
        cls(reduction="sum")


def test_a_learning_rate_schedule_is_taken_and_a_step_function_is_refused_by_name():
    decay = optimizers.schedules.ExponentialDecay(1e-3, decay_steps=100, decay_rate=0.5)
    assert optimizers.RMSprop(learning_rate=decay).schedule is decay
    # a function of the step is what a LearningRateSchedule is for (Keras calls a plain function with no argument)
    with pytest.raises(TypeError, match="subclass keras.optimizers.schedules.LearningRateSchedule"):
        optimizers.RMSprop(learning_rate=lambda step: 1e-3)


@pytest.mark.usefixtures("numpy_engine")
def test_one_callback_without_a_list_is_taken_as_keras_takes_it():
    seen = []

    class Spy(callbacks.Callback):
        def on_test_begin(self, logs=None):
            seen.append("test")

    model = models.Sequential([layers.Flatten(input_shape=(2, 2, 1)), layers.Dense(2, activation="softmax")])
    model.compile("rmsprop", "sparse_categorical_crossentropy")
    x, y = np.zeros((4, 2, 2, 1), np.float32), np.array([0, 1, 0, 1])
    model.evaluate(x, y, verbose=0, callbacks=Spy())
    assert seen == ["test"]
    with pytest.raises(TypeError, match="callbacks must be a list of gpucnn.callbacks.Callback"):
        model.evaluate(x, y, verbose=0, callbacks="EarlyStopping")


# ===================================================================================== the model's side
@pytest.mark.usefixtures("numpy_engine")
def test_fit_takes_one_callback_without_a_list():
    model = models.Sequential([layers.Flatten(input_shape=(2, 2, 1)), layers.Dense(2, activation="softmax")])
    model.compile("rmsprop", "sparse_categorical_crossentropy")
    stop = callbacks.EarlyStopping(monitor="loss", patience=0)
    model.fit(np.zeros((4, 2, 2, 1), np.float32), np.array([0, 1, 0, 1]), epochs=1, verbose=0, callbacks=stop)
    assert stop.model is model


def test_build_without_the_batch_dimension_says_so():
    model = models.Sequential([layers.Conv2D(2, 3), layers.Flatten(), layers.Dense(2)])
    with pytest.raises(ValueError, match=r"batch dimension.*build\(\(None, 28, 28, 1\)\)"):
        model.build((28, 28, 1))


def test_models_load_model_takes_restore_rng_and_custom_objects(tmp_path):
    model = models.Sequential([layers.Flatten(input_shape=(2, 2, 1)), layers.Dense(2)])
    model.build()
    model.save(tmp_path / "m.gpucnn")
    models.load_model(tmp_path / "m.gpucnn", restore_rng=False, custom_objects={})


def test_a_missing_keras_utility_says_so_and_lists_what_there_is():
    import gpucnn as keras
    with pytest.raises(AttributeError, match="gpucnn.utils has no 'plot_model'.*It has: set_random_seed, "
                                             "clear_session, to_categorical, image_dataset_from_directory, load_img, "
                                             "img_to_array, PyDataset"):
        keras.utils.plot_model
    assert all(callable(getattr(keras.utils, name)) for name in keras.utils._KERAS_UTILS)
    assert not hasattr(keras.utils, "plot_model")
