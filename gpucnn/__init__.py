"""gpucnn: the Keras convnet workflow on a NumPy engine everywhere and hand-written CUDA kernels on a GPU.

    import gpucnn as keras
    from gpucnn import layers

    inputs = keras.Input(shape=(28, 28, 1))
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    ...
    model = keras.Model(inputs=inputs, outputs=outputs)      # or keras.Sequential([...])

``GPUCNN_DEVICE=auto|gpu|cpu`` (or ``gpucnn.set_engine``) chooses the engine; see ``gpucnn.backend``.
Importing gpucnn never touches the GPU.
"""
from . import (activations, callbacks, data, datasets, initializers, layers, losses, metrics, models, ops, optimizers,
               saving, utils, viz)
from .backend import engine, set_engine
from .layers import Input
from .models import Model, Sequential

# keras.utils also holds the data pipelines (gpucnn.data, which itself builds on gpucnn.utils)
utils.image_dataset_from_directory = data.image_dataset_from_directory
utils.load_img, utils.img_to_array = data.load_img, data.img_to_array
utils.PyDataset = data.PyDataset

__version__ = "0.1.0"
__all__ = ["Input", "Model", "Sequential", "activations", "callbacks", "data", "datasets", "initializers", "layers",
           "losses", "metrics", "models", "ops", "optimizers", "saving", "utils", "viz", "engine", "set_engine",
           "__version__"]


def __getattr__(name):
    if name.startswith("_"):
        raise AttributeError(name)
    raise AttributeError(f"gpucnn has no {name!r}: gpucnn does not have that part of Keras (yet). "
                         f"`import gpucnn as keras` offers: {', '.join(__all__)}")
