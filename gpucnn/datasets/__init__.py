"""Small datasets with a Keras-compatible ``load_data()`` API.

Data files are cached under ``$GPUCNN_HOME/datasets`` (default
``~/.gpucnn/datasets``).
"""

from . import mnist

__all__ = ["mnist"]
