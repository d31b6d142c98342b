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


def model_from_config(config, custom_objects=None, where="config"):
    """A model from ``{"class_name", "config"}`` (or a bare Sequential config, as gpucnn's first files hold).
    Any defect raises ``saving.InvalidModelFile`` naming ``where``."""
    try:
        return _from_spec(_wrapped(config), custom_objects or {})
    except saving.InvalidModelFile:
        raise
    except (_Invalid, KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError,
            OverflowError, NotImplementedError) as exc:
        raise saving.InvalidModelFile(f"{where}: invalid model config ({type(exc).__name__}: {exc})") from None


def _wrapped(config):
    if isinstance(config, dict) and "class_name" not in config and "layers" in config:
        return {"class_name": "Sequential", "config": config}  # the format of gpucnn 0.1's files
    return config


def _from_spec(spec, custom_objects):
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise _Invalid("a layer entry must be a mapping with a 'config' mapping")
    name = spec.get("class_name")
    if name == "Sequential":
        return _sequential(spec["config"], custom_objects)
    if name == "Functional":
        return _functional(spec["config"], custom_objects)
    return _layer(spec, custom_objects)


def _layer(spec, custom_objects):
    name = spec["class_name"]
    if not isinstance(name, str):
        raise _Invalid(f"layer class name {name!r} is not a string")
    cls = custom_objects.get(name)
    if cls is not None:
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise TypeError(f"custom_objects[{name!r}] must be a subclass of gpucnn.layers.Layer, got {cls!r}")
    elif spec.get("custom"):
        raise saving.InvalidModelFile(
            f"the file holds a layer of a user's class {name!r} (not gpucnn's own {name!r}); pass the class: "
            f"load_model(path, custom_objects={{{name!r}: {name}}})")
    else:
        cls = LAYER_CLASSES.get(name)
        if cls is None:
            raise saving.InvalidModelFile(f"unknown layer class {name!r}; gpucnn builds only "
                                          f"{sorted(LAYER_CLASSES)} (and classes given in custom_objects=)")
    return cls(**spec["config"])


def _sequential(config, custom_objects):
    model = Sequential(name=str(config["name"]))
    if config.get("input_shape"):
        model.add(InputLayer(shape=tuple(config["input_shape"])))
    for spec in config["layers"]:
        model.add(_from_spec(spec, custom_objects))
    if not model.built and config.get("input_shape"):
        model.build((None,) + tuple(config["input_shape"]))
    return model


def _functional(config, custom_objects):
    specs = config["layers"]
    layers, outputs_of = {}, {}  # name -> layer; (name, local node index) -> output tensors
    pending = []
    for spec in specs:
        layer = _from_spec(spec, custom_objects)
        name = str(spec["name"])
        if name in layers:
            raise _Invalid(f"two layers are named {name!r}")
        layers[name] = layer
        if isinstance(layer, InputLayer):
            outputs_of[(name, 0)] = [layer.output]
        else:
            for k, inbound in enumerate(spec["inbound_nodes"]):
                pending.append((name, k, inbound))
    while pending:  # call each layer once the tensors it reads exist (shared layers may wait for later ones)
        waiting = []
        for name, k, inbound in pending:
            keys = [(str(n), int(i)) for n, i, _ in inbound]
            if not all(key in outputs_of for key in keys):
                waiting.append((name, k, inbound))
                continue
            tensors = [outputs_of[key][int(t)] for key, (_, _, t) in zip(keys, inbound)]
            layer = layers[name]
            out = layer(tensors if layer.multi_input else tensors[0])
            outputs_of[(name, k)] = [out]
        if len(waiting) == len(pending):
            raise _Invalid(f"the layer calls {[(n, k) for n, k, _ in waiting]} read tensors no layer makes")
        pending = waiting
    inputs = [outputs_of[(str(n), int(i))][int(t)] for n, i, t in config["input_layers"]]
    outputs = [outputs_of[(str(n), int(i))][int(t)] for n, i, t in config["output_layers"]]
    as_list = bool(config.get("outputs_as_list", len(outputs) > 1))
    return Model(inputs, outputs if as_list else outputs[0], name=str(config["name"]))


# ===================================================================================== files
def load_model(path, restore_rng=True, custom_objects=None):
    """Rebuild a model saved by ``model.save(path)``: same graph, weights, compile config and optimizer state.

    With ``restore_rng`` (the default) gpucnn's random generators are set back to their state at saving time,
    so ``fit(..., initial_epoch=k)`` continues exactly as the interrupted run would have. ``custom_objects``:
    ``{"ClassName": cls}`` for layers of your own classes (subclasses of ``gpucnn.layers.Layer``)."""
    header, members = saving.read_model_file(path)
    model = model_from_config(header.get("model_config"), custom_objects, where=str(path))
    saving.restore_model_state(model, header, members, path, restore_rng=restore_rng)
    return model


Model._from_config = staticmethod(model_from_config)  # Model.from_config builds through this module
