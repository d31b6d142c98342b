"""Models: the functional ``Model`` (a graph of layers), ``Sequential``, and ``load_model``.

``graph`` runs a model's layers (forward and backward, one code for every engine); ``trainer`` holds
compile/fit/evaluate/predict and the training step; ``fastpath`` captures that step as a CUDA graph on the GPU;
``parallel`` runs it as two half-batches in two processes on NumPy; ``summary`` prints Keras's table;
``serialization`` rebuilds models from configs and files.
"""
from .model import Model
from .sequential import Sequential
from .serialization import load_model, model_from_config
from .trainer import TrainingDivergedError

Functional = Model

__all__ = ["Model", "Sequential", "Functional", "load_model", "model_from_config", "TrainingDivergedError"]
