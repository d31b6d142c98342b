"""Data pipelines: images from folders, Python datasets, and the adapter ``fit`` reads batches through.

- ``image_dataset_from_directory`` (``gpucnn.data.images``): Keras 3's function, batches of images
  decoded by Pillow on background threads; ``load_img`` and ``img_to_array`` for one file;
- ``PyDataset`` (``gpucnn.data.py_dataset``): Keras's base class for datasets written in Python;
- ``adapt`` (``gpucnn.data.adapters``): arrays, datasets, generators and PyDatasets as epochs of
  ``(x_batch, y_batch)`` NumPy batches.
"""

from .adapters import Adapter, adapt
from .images import ImageDataset, image_dataset_from_directory, img_to_array, load_img
from .py_dataset import PyDataset

__all__ = ["Adapter", "ImageDataset", "PyDataset", "adapt", "image_dataset_from_directory", "img_to_array", "load_img"]
