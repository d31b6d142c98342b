"""Small datasets with a Keras-compatible ``load_data()`` API: ``mnist``, ``fashion_mnist``, ``cifar10``.

Data files are cached under ``$GPUCNN_HOME/datasets`` (default ``~/.gpucnn/datasets``); the first
load of each needs network access.
"""

from . import cifar10, fashion_mnist, mnist

__all__ = ["cifar10", "fashion_mnist", "mnist"]
