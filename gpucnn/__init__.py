"""gpucnn: the Keras convnet workflow on a NumPy engine everywhere and hand-written CUDA kernels on a GPU.

    from gpucnn import layers, models
    model = models.Sequential([layers.Conv2D(32, (3, 3), activation="relu", input_shape=(28, 28, 1)), ...])

``GPUCNN_DEVICE=auto|gpu|cpu`` (or ``gpucnn.set_engine``) chooses the engine; see ``gpucnn.backend``.
Importing gpucnn never touches the GPU.
"""
from . import callbacks, datasets, layers, losses, models, optimizers, saving, utils, viz
from .backend import engine, set_engine

__version__ = "0.1.0"
__all__ = ["callbacks", "datasets", "layers", "losses", "models", "optimizers", "saving", "utils", "viz",
           "engine", "set_engine", "__version__"]
