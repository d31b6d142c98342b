"""Models: ``Sequential`` and ``load_model``."""
from .model import Sequential, TrainingDivergedError, load_model

__all__ = ["Sequential", "TrainingDivergedError", "load_model"]
