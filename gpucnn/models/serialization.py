"""Models from JSON-able configs (``model_from_config``; ``Model.get_config`` writes them), and whole models from
files (``load_model``; ``Model.save`` writes them).

A config names layer classes and how their calls connect — nothing executable. ``model_from_config`` constructs
only gpucnn's own layer classes (``gpucnn.layers.LAYER_CLASSES``), ``Sequential`` and ``Functional`` models, and
the classes the caller names in ``custom_objects`` (subclasses of ``Layer``). A saved layer whose class is a user's
subclass is marked so: loading it without ``custom_objects`` is refused, never silently replaced by a built-in.

Configs (the ``config`` part of ``{"class_name", "config"}``):
  * Sequential: ``{"name", "input_shape", "layers": [{"class_name", "config"}, ...]}``;
  * Functional: ``{"name", "layers": [{"class_name", "config", "name", "inbound_nodes"}, ...], "input_layers",
    "output_layers"}``: each inbound node is a list of ``[layer name, node index, tensor index]`` — the calls of
    a layer counted within this model — as Keras writes them.
"""
from .. import saving
from ..layers import LAYER_CLASSES, InputLayer, Layer
from .model import Model
from .sequential import Sequential


# ===================================================================================== from configs
class _Invalid(ValueError):
    pass


def model_from_config(config, custom_objects=None, where="config", classes=None):
    """A model from ``{"class_name", "config"}`` (or a bare Sequential config, as gpucnn's first files hold).
    ``classes``: the layer classes by name it may construct (default: gpucnn's, the registered ones and
    ``custom_objects``). Any defect raises ``saving.InvalidModelFile`` naming ``where``."""
    classes = saving.layer_classes(custom_objects) if classes is None else classes
    try:
        return _from_spec(_wrapped(config), classes)
    except saving.InvalidModelFile:
        raise
    except (_Invalid, KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError,
            OverflowError, NotImplementedError) as exc:
        raise saving.InvalidModelFile(f"{where}: invalid model config ({type(exc).__name__}: {exc})") from None


def model_from_json(json_string, custom_objects=None):
    """Keras's: the model ``model.to_json()`` described (unbuilt weights: new ones, drawn by its initializers)."""
    import json
    return model_from_config(json.loads(json_string), custom_objects, where="model_from_json")


def clone_model(model):
    """Keras's clone_model: the same architecture with new layers and new weights (drawn by their initializers)."""
    from ..layers import serialize
    return model_from_config(serialize(model), where="clone_model")


def _wrapped(config):
    if isinstance(config, dict) and "class_name" not in config and "layers" in config:
        return {"class_name": "Sequential", "config": config}  # the format of gpucnn 0.1's files
    return config


def _from_spec(spec, classes):
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise _Invalid("a layer entry must be a mapping with a 'config' mapping")
    name = spec.get("class_name")
    if name == "Sequential":
        return _sequential(spec["config"], classes)
    if name == "Functional":
        return _functional(spec["config"], classes)
    return _layer(spec, classes)


def _layer(spec, classes):
    name = spec["class_name"]
    if not isinstance(name, str):
        raise _Invalid(f"layer class name {name!r} is not a string")
    cls = classes.get(name)
    if cls is None:
        raise saving.InvalidModelFile(
            f"unknown layer class {name!r}; gpucnn builds only {sorted(classes)}. For a layer class of your own, "
            "pass load_model(path, custom_objects={name: class})")
    if spec.get("custom") and cls is LAYER_CLASSES.get(name):
        raise saving.InvalidModelFile(
            f"the file holds a layer of a user's class {name!r} (not gpucnn's own {name!r}); pass the class: "
            f"load_model(path, custom_objects={{{name!r}: {name}}})")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise TypeError(f"layer class {name!r} must be a subclass of gpucnn.layers.Layer, got {cls!r}")
    return cls(**spec["config"])


def _sequential(config, classes):
    model = Sequential(name=str(config["name"]))
    if config.get("input_shape"):
        model.add(InputLayer(shape=tuple(config["input_shape"])))
    for spec in config["layers"]:
        model.add(_from_spec(spec, classes))
    if not model.built and config.get("input_shape"):
        model.build((None,) + tuple(config["input_shape"]))
    model._trainable = config.get("trainable", True) is not False  # (its own flag: its layers keep theirs)
    return model


def _functional(config, classes):
    specs = config["layers"]
    layers, outputs_of = {}, {}  # name -> layer; (name, local node index) -> output tensors
    pending = []
    for spec in specs:
        layer = _from_spec(spec, classes)
        name = str(spec["name"])
        if name in layers:
            raise _Invalid(f"two layers are named {name!r}")
        layers[name] = layer
        if isinstance(layer, InputLayer):
            outputs_of[(name, 0)] = [layer.output]
        else:
            training = spec.get("call_training") or [None] * len(spec["inbound_nodes"])
            if len(training) != len(spec["inbound_nodes"]) or not all(t in (None, True, False) for t in training):
                raise _Invalid(f"layer {name!r}: call_training must give None, true or false for each call")
            for k, inbound in enumerate(spec["inbound_nodes"]):
                pending.append((name, k, inbound, training[k]))
    while pending:  # call each layer once the tensors it reads exist (shared layers may wait for later ones)
        waiting = []
        for name, k, inbound, training in pending:
            keys = [(str(n), int(i)) for n, i, _ in inbound]
            if not all(key in outputs_of for key in keys):
                waiting.append((name, k, inbound, training))
                continue
            tensors = [outputs_of[key][int(t)] for key, (_, _, t) in zip(keys, inbound)]
            layer = layers[name]
            out = layer(tensors if layer.multi_input else tensors[0], training=training)
            outputs_of[(name, k)] = [out]
        if len(waiting) == len(pending):
            raise _Invalid(f"the layer calls {[(n, k) for n, k, _, _ in waiting]} read tensors no layer makes")
        pending = waiting
    inputs = [outputs_of[(str(n), int(i))][int(t)] for n, i, t in config["input_layers"]]
    outputs = [outputs_of[(str(n), int(i))][int(t)] for n, i, t in config["output_layers"]]
    as_list = bool(config.get("outputs_as_list", len(outputs) > 1))
    return Model(inputs, outputs if as_list else outputs[0], name=str(config["name"]),
                 trainable=config.get("trainable", True) is not False)


# ===================================================================================== files
def load_model(filepath, custom_objects=None, compile=True, safe_mode=True, restore_rng=True):
    """Rebuild a model saved by ``model.save(path)``: same graph, weights, compile config and optimizer state
    (``compile=False``: uncompiled, as Keras's).

    With ``restore_rng`` (the default) gpucnn's random generators are set back to their state at saving time,
    so ``fit(..., initial_epoch=k)`` continues exactly as the interrupted run would have. ``custom_objects``:
    ``{"ClassName": cls}`` for layers of your own classes (subclasses of ``gpucnn.layers.Layer``). ``safe_mode``
    (Keras's) is accepted: a gpucnn file never holds code to run."""
    def build(config, classes, where):
        return model_from_config(config, where=str(where), classes=classes)
    return saving.read_model(filepath, build, restore_rng=restore_rng, custom_objects=custom_objects,
                             compile=compile)


Model._from_config = staticmethod(model_from_config)  # Model.from_config builds through this module
