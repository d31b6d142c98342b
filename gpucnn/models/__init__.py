"""Models: the functional ``Model`` (a graph of layers), ``Sequential``, and ``load_model``.

``graph`` runs a model's layers (forward and backward, one code for every engine); ``trainer`` holds
compile/fit/evaluate/predict and the training step; ``fastpath`` captures that step as a CUDA graph on the GPU;
``parallel`` runs it as two half-batches in two processes on NumPy; ``summary`` prints Keras's table;
``serialization`` rebuilds models from configs and files.
"""
from ..utils import missing
from .model import Model
from .sequential import Sequential
from .serialization import clone_model, load_model, model_from_config, model_from_json
from .trainer import TrainingDivergedError

Functional = Model

__all__ = ["Model", "Sequential", "Functional", "clone_model", "load_model", "model_from_config", "model_from_json",
           "TrainingDivergedError"]


def __getattr__(name):
    raise missing("gpucnn.models", name, "part of keras.models", __all__)
