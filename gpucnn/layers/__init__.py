"""Keras-style layers, channels-last: ``from gpucnn import layers`` as ``from keras import layers``.

One module per family: ``core`` (Input, Dense, Activation, Dropout, Flatten), ``convolutional`` (Conv2D),
``depthwise`` (DepthwiseConv2D, SeparableConv2D), ``pooling``, ``normalization`` (BatchNormalization),
``reshaping`` (ZeroPadding2D, Reshape), ``activations`` (ReLU, LeakyReLU, ELU, Softmax), ``merging`` (Add,
Concatenate, and their functions ``add``, ``concatenate``), ``preprocessing`` (Rescaling and the random image
augmentations: RandomFlip, RandomRotation, RandomZoom, RandomTranslation, RandomContrast); ``base`` holds the Layer
class every layer derives from, and
``tensor`` the symbolic tensors that calling a layer on ``Input`` creates. A layer's maths is the active
engine's ops (``gpucnn.backend.ops()``).
"""
import warnings

from .activations import ELU, LeakyReLU, ReLU, Softmax
from .base import Layer, window_geometry
from .convolutional import Conv2D, ConvPool, fusable_pool
from .core import Activation, Dense, Dropout, Flatten, Input, InputLayer
from .depthwise import DepthwiseConv2D, SeparableConv2D
from .merging import Add, Concatenate, add, concatenate
from .normalization import BatchNormalization, ConvBN, fusable_bn
from .pooling import AveragePooling2D, GlobalAveragePooling2D, GlobalMaxPooling2D, MaxPooling2D
from .preprocessing import (RandomContrast, RandomFlip, RandomRotation, RandomTranslation, RandomZoom,
                            Rescaling)
from .reshaping import Reshape, ZeroPadding2D
from .tensor import KerasTensor, Node
from ..utils import missing

# Keras's aliases
MaxPool2D, AvgPool2D = MaxPooling2D, AveragePooling2D
GlobalMaxPool2D, GlobalAvgPool2D = GlobalMaxPooling2D, GlobalAveragePooling2D

# Layer classes by name: what a saved model may name (nothing else is ever constructed from a file).
LAYER_CLASSES = {cls.__name__: cls for cls in (
    InputLayer, Conv2D, DepthwiseConv2D, SeparableConv2D, MaxPooling2D, AveragePooling2D, GlobalAveragePooling2D,
    GlobalMaxPooling2D, BatchNormalization, ZeroPadding2D, Reshape, Flatten, Dense, Activation, ReLU, LeakyReLU,
    ELU, Softmax, Dropout, Add, Concatenate, Rescaling, RandomFlip, RandomRotation, RandomZoom, RandomTranslation,
    RandomContrast)}

# Your own layer classes made known to load_model by name (saving.register_layer_class, Keras's
# register_keras_serializable): saved without the warning that loading needs custom_objects.
REGISTERED_CLASSES = {}

__all__ = sorted(LAYER_CLASSES) + ["Input", "Layer", "MaxPool2D", "AvgPool2D", "GlobalMaxPool2D", "GlobalAvgPool2D",
                                   "add", "concatenate"]


def serialize(obj):
    """``{"class_name", "config"}`` of a layer or a model (models: ``Sequential`` or ``Functional``). A layer of a
    user's class is marked ``custom`` (loading it needs ``custom_objects=``), with a warning saying so unless the class
    is registered."""
    model_kind = getattr(obj, "config_class_name", None)
    if model_kind is not None:
        return {"class_name": model_kind, "config": obj.get_config()}
    spec = {"class_name": type(obj).__name__, "config": obj.get_config()}
    if LAYER_CLASSES.get(type(obj).__name__) is not type(obj):
        spec["custom"] = True
        if REGISTERED_CLASSES.get(type(obj).__name__) is type(obj):
            return spec
        warnings.warn(
            f"layer {obj.name!r} is of class {type(obj).__module__}.{type(obj).__qualname__}, which is not one of "
            f"gpucnn's own layers: the file records its name and config only, and loading it needs the class: "
            f"load_model(path, custom_objects={{{type(obj).__name__!r}: {type(obj).__name__}}})",
            UserWarning, stacklevel=4)
    return spec


def __getattr__(name):
    raise missing("gpucnn.layers", name, "Keras layer", __all__)
