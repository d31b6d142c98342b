"""``Model``: Keras's functional model — a graph of layers from ``keras.Input`` tensors to output tensors — and
the base of ``Sequential``.

    inputs = keras.Input(shape=(28, 28, 1))
    x = layers.Conv2D(32, 3, activation="relu")(inputs)
    ...
    model = keras.Model(inputs=inputs, outputs=outputs)

A model is also a layer: calling it on a symbolic tensor nests it in another model, calling it on an array runs
it. Layers own their weights; a layer in several models is one set of weights. To train, a model gathers its
trainable weights into one flat buffer (and their gradients into another) so the optimizer updates them all in
one engine launch: each layer's weights become views into it. When another model sharing layers trains in
between, the next ``fit`` takes the layers' current weights back into this model's buffer (``_adopt_weights``),
so every model always sees the same, latest values.
"""
import numpy as np

from .. import backend, saving
from ..layers import InputLayer, Layer, serialize
from ..layers.tensor import is_symbolic
from ..layers.variables import Variable
from ..layers.base import remember_replaced, trainable_flag
from ..utils import eager, next_name
from . import summary as summary_mod
from .graph import Contexts, Graph
from .trainer import Trainer

_ALIGN = 64  # each weight starts on a 256-byte boundary of the flat buffer


def _opened(model, layers_of):
    """The layers of ``model`` in the order ``layers_of(model)`` gives, nested models opened in place, each layer
    once, InputLayers left out."""
    out, seen = [], set()

    def walk(m):
        for layer in layers_of(m):
            if isinstance(layer, Model):
                walk(layer)
            elif not isinstance(layer, InputLayer) and id(layer) not in seen:
                seen.add(id(layer))
                out.append(layer)
    walk(model)
    return out


def _moved(states, before, after, total, xp, parked):
    """The optimizer's state buffers ``states`` ({name: flat array} laid out as ``before``: {slot: (offset, size)})
    laid out as ``after`` ({slot: offset}) over ``total`` values. A slot in both keeps its values; a slot that
    leaves (a weight frozen) is parked in ``parked`` ({slot: {name: values}}) and one that comes back (unfrozen)
    takes its parked values, as Keras's optimizer keeps a variable's state while it is frozen; a weight new to
    training starts from zeros. ``parked`` is updated only where ``after`` is the live layout (``xp`` given)."""
    out = {name: (xp or np).zeros(total, dtype=np.float32) for name in states}
    for slot, (start, size) in before.items():
        if slot not in after and xp is not None:
            parked[slot] = {name: old[start:start + size].copy() for name, old in states.items()}
    for slot, lo in after.items():
        for name, new in out.items():
            if slot in before:
                start, size = before[slot]
                new[lo:lo + size] = states[name][start:start + size]
            elif name in parked.get(slot, {}):
                kept = parked[slot][name]
                new[lo:lo + kept.shape[0]] = kept
        if xp is not None:
            parked.pop(slot, None)
    return out


class Model(Trainer, Layer):
    """``Model(inputs, outputs, name=None)``: the functional model from ``inputs`` (tensors of ``keras.Input``)
    to ``outputs`` (a tensor or a list of them)."""

    config_class_name = "Functional"  # the class a saved config names (as Keras names it)

    def __init__(self, inputs=None, outputs=None, name=None, trainable=True):
        if inputs is None or outputs is None:
            raise TypeError("Model needs inputs= and outputs=: Model(inputs=keras.Input(shape=...), outputs=...). "
                            "gpucnn does not support subclassing Model with a call() method yet; write the model "
                            "with the functional API or Sequential")
        for what, value in (("inputs", inputs), ("outputs", outputs)):
            if isinstance(value, dict):
                raise NotImplementedError(f"Model: gpucnn does not support a dict of {what} (named {what}); give a "
                                          f"tensor or a list of tensors, e.g. outputs=[{', '.join(map(str, value))}]")
        self._init_model(name or next_name("functional"), trainable)
        self._inputs_were_list = isinstance(inputs, (list, tuple))
        self._outputs_were_list = isinstance(outputs, (list, tuple))
        inputs = list(inputs) if self._inputs_were_list else [inputs]
        outputs = list(outputs) if self._outputs_were_list else [outputs]
        if len(inputs) != 1:
            raise NotImplementedError(f"Model {self.name!r}: gpucnn supports models with one input (got "
                                      f"{len(inputs)}); several inputs are not supported yet")
        self._set_graph(Graph(inputs, outputs, owner=f"Model {self.name!r}"))

    def _init_model(self, name, trainable=True):
        self.name = name
        self._inbound_nodes = []
        self._trainable = trainable_flag(trainable, self)
        self._declared_input = None
        self.graph = None
        self.built = False
        self.optimizer = self.loss = None
        self.metrics = []
        self.stop_training = False
        self.history = None
        self._contexts_cache = {}
        self._params = self._grads = None
        self._layout = None
        self._trainable_key = None  # each layer's trainable when the flat buffers were packed
        self._last_logs = {}
        self._version = 0  # counts changes of the graph and compiles: what the step's helpers may keep depends on it

    def _set_graph(self, graph):
        self.graph = graph
        self.built = True
        self._version += 1
        self._contexts_cache.clear()
        self._eager_step = None  # the random layers may have changed
        self._layout = None  # (the optimizer's state follows the weights into the next layout: _pack_weights)
        names = {}
        for layer in graph.layers:
            other = names.setdefault(layer.name, layer)
            if other is not layer:
                raise ValueError(f"Model {self.name!r}: two different layers are named {layer.name!r}; layer names "
                                 "must be unique in a model (pass name=... to tell them apart)")

    # ================================================================================= the graph view
    @property
    def layers(self):
        """The layers in the order the graph computes them (the InputLayer first, as Keras lists it)."""
        return list(self.graph.layers) if self.graph is not None else []

    @property
    def inputs(self):
        self._require_built("inputs")
        return list(self.graph.inputs)

    @property
    def outputs(self):
        self._require_built("outputs")
        return list(self.graph.outputs)

    @property
    def input(self):
        inputs = self.inputs
        return inputs[0] if len(inputs) == 1 else inputs

    @property
    def output(self):
        outputs = self.outputs
        return outputs[0] if len(outputs) == 1 and not self._outputs_were_list else outputs

    @property
    def input_shape(self):
        """Keras's input shape, with the batch dimension: ``(None, 28, 28, 1)``."""
        return self.inputs[0].shape if self.built else None

    @property
    def output_shape(self):
        self._require_built("output_shape")
        shapes = [t.shape for t in self.graph.outputs]
        return shapes[0] if len(shapes) == 1 else shapes

    def get_layer(self, name=None, index=None):
        """The layer named ``name`` (or at position ``index`` of ``layers``)."""
        if index is not None:
            if not -len(self.layers) <= index < len(self.layers):
                raise ValueError(f"get_layer: index {index} is out of range for {len(self.layers)} layers")
            return self.layers[index]
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise ValueError(f"no layer named {name!r}; layers: {[layer.name for layer in self.layers]}")

    def _refuse_layers_shared_with_nested_models(self):
        """A config names each layer inside the model that holds it: one layer object held by two models (a layer
        called inside a nested model and outside it) would come back as two layers with weights of their own, so
        saving, to_json and clone_model would build another model. Refused, saying what works."""
        owner = {}

        def visit(model):
            for layer in model.layers:
                held = owner.setdefault(id(layer), model)
                if held is not model:
                    raise ValueError(
                        f"layer {layer.name!r} is held by model {held.name!r} and by model {model.name!r} (a layer "
                        "called inside a nested model and outside it): a saved file or config holds each layer once, "
                        "in one model, so it would load as two layers with weights of their own. Save the weights "
                        "(model.save_weights(...)) and build the model with your code, or call the layer in one "
                        "place only")
                if isinstance(layer, Model):
                    visit(layer)
        visit(self)

    def _all_layers(self):
        """Every layer that computes, nested models opened, each once (InputLayers left out), in Keras's order. Kept
        until the graph changes: a training step asks for it several times."""
        kept = getattr(self, "_all_layers_kept", None)
        if kept is not None and kept[0] is self.graph:
            return kept[1]
        out = _opened(self, lambda model: model.layers)
        self._all_layers_kept = (self.graph, out)
        return out

    def _layers_in_call_order(self):
        """``_all_layers`` ordered as the layers were first called (the order of earlier gpucnn versions; the same
        as Keras's where the graph has no branches)."""
        def in_call_order(model):
            calls = {}
            for node in (model.graph.nodes if model.graph is not None else ()):
                calls[id(node.layer)] = min(calls.get(id(node.layer), node.order), node.order)
            return sorted(model.layers, key=lambda layer: calls.get(id(layer), -1))
        return _opened(self, in_call_order)

    def _require_built(self, what):
        if not self.built:
            raise ValueError(f"{what}: the model has not been built yet. Give the first layer input_shape=..., "
                             "start with keras.Input(shape=...), call model.build((None, 28, 28, 1)) with your "
                             "shape, or fit it first.")

    def build(self, input_shape=None):
        """A functional model is built when it is made; ``input_shape`` (batch first) is only checked."""
        if input_shape is not None and tuple(input_shape)[1:] != self.inputs[0].sample_shape:
            raise ValueError(f"Model {self.name!r} is built for inputs {self.input_shape}, not {tuple(input_shape)}")

    def _build_for_data(self, sample_shape):
        self._require_built("the data")

    # ================================================================================= weights
    @property
    def trainable(self):
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        """Keras: freezing a model freezes every layer in it (effective at the next training step)."""
        self._trainable = trainable_flag(value, self)
        for layer in self.layers:
            if not isinstance(layer, InputLayer):
                layer.trainable = value

    def _weight_slots(self):
        """(layer, index) of every weight, each once, in Keras's order."""
        return [(layer, i) for layer in self._all_layers() for i in range(len(layer.weights))]

    @property
    def weights(self):
        """Every weight as Keras's variables (``Variable``: each follows its layer's current values)."""
        return [Variable(layer, i) for layer, i in self._weight_slots()]

    @property
    def variables(self):
        return self.weights

    @property
    def trainable_weights(self):
        trains = self._trains()
        return [Variable(layer, i) for layer, i in self._weight_slots() if trains(layer, i)]

    @property
    def non_trainable_weights(self):
        trains = self._trains()
        return [Variable(layer, i) for layer, i in self._weight_slots() if not trains(layer, i)]

    trainable_variables, non_trainable_variables = trainable_weights, non_trainable_weights

    def count_params(self):
        self._require_built("count_params")
        return sum(layer.count_params() for layer in self._all_layers())

    def get_weights(self):
        """Every layer's weights, in order, as NumPy arrays (Keras's order and layouts)."""
        self._require_built("get_weights")
        return [w for layer in self._all_layers() for w in layer.get_weights()]

    def set_weights(self, weights):
        """Set all weights from a list like ``get_weights()`` returns (e.g. a Keras model's)."""
        self._require_built("set_weights")
        weights = list(weights)
        expected = len(self._weight_slots())
        if len(weights) != expected:
            raise ValueError(f"the model has {expected} weight arrays, got {len(weights)}")
        checked, i = [], 0
        for layer in self._all_layers():  # every array checked before any is set: a refused list changes nothing
            n = len(layer.weights)
            checked.append((layer, layer._checked_weights(weights[i:i + n])))
            i += n
        for layer, values in checked:
            layer._assign_weights(values)

    def _frozen_ids(self):
        """ids of the layers held by a model that is not trainable — this one or one nested in it: Keras's rule, such
        a model has no trainable weights whatever its layers' own flags (``Model(..., trainable=False)`` freezes
        only its own view: the same layers in another model still train)."""
        frozen = set()

        def walk(model, off):
            for layer in model.layers:
                if isinstance(layer, Model):
                    walk(layer, off or not layer._trainable)
                elif off and not isinstance(layer, InputLayer):
                    frozen.add(id(layer))
        walk(self, not self._trainable)
        return frozen

    def _trains(self, frozen=None):
        """A predicate ``(layer, index) -> bool``: whether this model trains that weight."""
        frozen = self._frozen_ids() if frozen is None else frozen
        return lambda layer, i: layer.trainable and id(layer) not in frozen and layer._weight_trainable[i]

    def _flat_layout(self, slots):
        """(trained slots, their offsets, total length) of the flat buffer holding the trained weights among
        ``slots`` ((layer, index) pairs) in that order, each starting on an _ALIGN boundary."""
        trains = self._trains()
        trained = [(layer, i) for layer, i in slots if trains(layer, i)]
        sizes = [int(np.prod(layer.weights[i].shape)) for layer, i in trained]
        offsets = np.cumsum([0] + [-(-size // _ALIGN) * _ALIGN for size in sizes])
        return trained, [int(o) for o in offsets[:-1]], int(offsets[-1])

    def _pack_weights(self, params=None, grads=None):
        """Gather the trainable weights into one flat buffer and their gradients into another (new ones, or the
        float32 arrays ``params`` and ``grads`` of the right size); the layers keep views into them.

        The optimizer's state comes along weight by weight, as Keras's optimizer keeps a state per variable: from
        wherever it was laid out (this model's buffers before a change of which weights train, or another model's
        of the same layers: the optimizer records where, ``lay_out``) to the new layout; its step count stays. A
        weight that leaves training keeps its state aside until it trains again (``_moved``), and a weight new to
        the optimizer starts from zeros, as a new optimizer would."""
        xp = backend.ops().xp
        if self.optimizer is not None:
            self.optimizer.anchor_exclusions(self._weight_slots())  # before the layers' arrays become views
        slots, offsets, total = self._flat_layout(self._weight_slots())
        self._params = xp.zeros(total, dtype=np.float32) if params is None else params
        self._grads = xp.zeros(total, dtype=np.float32) if grads is None else grads
        self._layout = []
        for (layer, i), lo in zip(slots, offsets):
            size = int(np.prod(layer.weights[i].shape))
            shape = layer.weights[i].shape
            view = self._params[lo:lo + size].reshape(shape)
            view[...] = layer.weights[i]
            gview = self._grads[lo:lo + size].reshape(shape)
            remember_replaced(layer.weights[i], layer, i)
            layer.weights[i], layer.grads[i] = view, gview
            self._layout.append((layer, i, view, gview, lo))
        self._trainable_key = self._trainable_flags()
        opt = self.optimizer
        if opt is None:
            return
        if opt.state is not None:
            if any(v.shape[0] != opt.laid_out_total for v in opt.state.values()):
                raise RuntimeError("gpucnn: the optimizer's state does not match the layout it recorded")
            after = {(id(layer), i): lo for layer, i, _, _, lo in self._layout}
            opt.state = _moved(opt.state, opt.laid_out, after, total, xp, opt.parked)
            for slot in [slot for slot in opt.parked if slot not in opt.known]:
                del opt.parked[slot]  # (the zeros of a weight it never stepped are no state of its own)
        opt.lay_out(self, self._layout, total)

    def _weights_unknown_to(self, optimizer):
        """The (layer, index) weights this model trains that ``optimizer``, which has trained, holds no state for
        (laid out or parked): weights of another model, layers unfrozen or added since (Keras's unknown variables);
        [] for an optimizer that has not trained yet."""
        if optimizer._owner is None:
            return []
        slots, _, _ = self._flat_layout(self._weight_slots())
        return [slot for slot in slots if not optimizer.knows([slot])]

    def _state_for_file(self):
        """The optimizer's state buffers as NumPy arrays laid out over the weights this model trains now (what a saved
        file holds), wherever the optimizer has them laid out (this model's buffers, before a change of which weights
        train, or another model's of the same layers), without laying the live buffers out again (another model's
        fit may be training them); None before the optimizer's first step."""
        opt = self.optimizer
        if opt is None or opt.state is None:
            return None
        states = {name: backend.to_numpy(v) for name, v in opt.state.items()}
        slots, offsets, total = self._flat_layout(self._weight_slots())
        after = {(id(layer), i): lo for (layer, i), lo in zip(slots, offsets)}
        parked = {slot: {name: backend.to_numpy(v) for name, v in kept.items()} for slot, kept in opt.parked.items()}
        out = states if total == opt.laid_out_total and {slot: lo for slot, (lo, _) in opt.laid_out.items()} == after \
            else _moved(states, opt.laid_out, after, total, None, parked)
        # the state of this model's weights that do not train now (frozen since they trained): set aside, and kept in
        # the file too (saving.PARKED_KEY), so that a model loaded and unfrozen goes on as the saved one would
        for k, (layer, i) in enumerate(self._weight_slots()):
            slot = (id(layer), i)
            if slot in after or slot not in opt.known:  # (zeros laid out for a weight never stepped are no state)
                continue
            if slot in parked:
                kept = parked[slot]
            elif slot in opt.laid_out:
                lo, size = opt.laid_out[slot]
                kept = {name: values[lo:lo + size] for name, values in states.items()}
            else:
                continue
            out.update((saving.PARKED_KEY.format(k, name), values) for name, values in kept.items())
        return out

    def _trainable_flags(self):
        return tuple(layer.trainable for layer in self._all_layers()), frozenset(self._frozen_ids())

    def _sync_trainable(self):
        """Lay the flat buffers out again when a layer's ``trainable`` changed since they were packed (a layer frozen
        or unfrozen between fits, or by a callback), keeping the optimizer's state: the next step trains exactly
        the weights that are trainable now, as Keras 3 does (its guide's ``compile`` after the change also works).
        Returns whether it did."""
        if self._layout is None or self._trainable_flags() == self._trainable_key:
            return False
        if self.optimizer is not None:
            self._refuse_unknown_weights(self.optimizer)  # a layer unfrozen that it never trained
        self._pack_weights()
        self._contexts_cache.clear()  # the steps' contexts know which layers need gradients
        self._version += 1
        return True

    def _adopt_weights(self):
        """Make every trainable weight a view into this model's flat buffer again, taking the current values
        (another model that shares layers may have trained them in its own buffer since), first laying the buffer
        out again if which layers are trainable changed (``_sync_trainable``)."""
        if self._layout is None:
            self._pack_weights()
            return
        for layer, i, view, gview, _ in self._layout:
            if layer.weights[i] is not view:
                view[...] = layer.weights[i]
                remember_replaced(layer.weights[i], layer, i)
                layer.weights[i] = view
            layer.grads[i] = gview
        self._sync_trainable()

    # ================================================================================= a model as a layer
    def __call__(self, inputs, training=None):
        """On a symbolic tensor: nest this model in another (one row of its summary). On an array: the outputs
        for that batch, in host memory on either engine (NumPy arrays with ``numpy()``, as ``predict`` gives).
        ``training=None``, as Keras: each layer's own default (random augmentation layers augment, Dropout passes
        values through)."""
        if is_symbolic(inputs):
            return self._call_symbolic(inputs, training)
        x = self._as_engine_array(inputs[0] if isinstance(inputs, (list, tuple)) and len(inputs) == 1 else inputs)
        self._build_for_data(x.shape[1:])
        self._check_call_shapes(x.shape[1:])
        outs = self.graph.forward([x], training, Contexts(self.graph) if training else
                                  self._contexts(len(x), False))
        return eager(outs[0] if len(outs) == 1 and not self._outputs_were_list else outs)

    def _symbolic_output_shape(self, in_shape):
        self._build_for_data(tuple(in_shape))
        self._check_call_shapes(in_shape)
        if len(self.graph.outputs) != 1:
            raise NotImplementedError(f"nesting model {self.name!r} with {len(self.graph.outputs)} outputs in "
                                      "another model is not supported yet")
        return self.graph.outputs[0].sample_shape

    def _check_call_shapes(self, shapes):
        want = self.graph.inputs[0].sample_shape
        if tuple(shapes) != want:
            raise ValueError(f"model {self.name!r} takes per-sample inputs of shape {want}, got {tuple(shapes)}")

    def forward(self, x, training, ctx):
        inner = ctx.get("inner")
        if inner is None or inner.step is not ctx.get("step"):
            inner = ctx["inner"] = Contexts(self.graph, step=ctx.get("step"), inputs_need=ctx.get("need_dx", False),
                                            written_before=ctx.get("written_before", ()))
        return self.graph.forward([x], training, inner)[0]

    def backward(self, dy, ctx):
        return self.graph.backward([dy], ctx["inner"])[0]

    # ================================================================================= summary, saving
    def summary(self, line_length=None, positions=None, print_fn=None, expand_nested=False, show_trainable=False,
                layer_range=None):
        """Print Keras's summary table: layer (type), output shape, parameter count (and "Connected to" when the
        graph is not a chain; "Trainable" with ``show_trainable``), then the totals. Keras's arguments, in its
        order: ``positions`` (the columns' right edges), ``expand_nested`` (nested models' layers too),
        ``layer_range`` (two layer names or patterns, the rows from the first to the last)."""
        self._require_built("summary")
        summary_mod.print_summary(self, print_fn or print, line_length, show_trainable=bool(show_trainable),
                                  positions=positions, expand_nested=bool(expand_nested), layer_range=layer_range)

    def layer_outputs(self, x, layers=None):
        """The output of every layer (or of the named ones) for inputs ``x``, as NumPy arrays in a dict keyed by
        layer name, in model order: the feature maps a convnet computes."""
        x = self._check_x(x)
        nodes = [n for n in self.graph.nodes if not isinstance(n.layer, InputLayer)]
        known = [n.layer.name for n in nodes]
        names = known if layers is None else list(layers)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"no layer named {unknown[0]!r}; layers: {known}")
        chosen = [n.outputs[0] for n in nodes if n.layer.name in names]
        outs = Model(self.graph.inputs, chosen, name=f"{self.name}_outputs").predict(x, verbose=0)
        outs = outs if isinstance(outs, list) else [outs]
        return {t.node.layer.name: o for t, o in zip(chosen, outs)}

    def get_config(self):
        """The graph as JSON-able data: every layer's class and config, and which tensors each call reads as
        ``[layer name, call index, tensor index]`` (Keras's format); ``gpucnn.models.serialization`` reads it."""
        self._refuse_layers_shared_with_nested_models()
        graph = self.graph

        def local_index(node):
            return [n for n in graph.nodes if n.layer is node.layer].index(node)

        layers = []
        for layer in graph.layers:
            spec = serialize(layer)
            spec["name"] = layer.name
            calls = [node for node in graph.nodes if node.layer is layer and not isinstance(layer, InputLayer)]
            spec["inbound_nodes"] = [[[t.node.layer.name, local_index(t.node), t.index] for t in node.inputs]
                                     for node in calls]
            if any(node.training is not None for node in calls):  # the training= each call was written with
                spec["call_training"] = [node.training for node in calls]
            layers.append(spec)
        return {"name": self.name, "layers": layers, **({} if self._trainable else {"trainable": False}),
                "input_layers": [[t.node.layer.name, 0, 0] for t in graph.inputs],
                "output_layers": [[t.node.layer.name, local_index(t.node), t.index] for t in graph.outputs],
                "outputs_as_list": bool(self._outputs_were_list)}

    def to_json(self, **kwargs):
        """The model's architecture as JSON (Keras's ``to_json``; ``keras.models.model_from_json`` reads it)."""
        import json
        return json.dumps(serialize(self), **kwargs)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """A model from ``get_config()`` output (or ``{"class_name", "config"}``)."""
        if isinstance(config, dict) and "class_name" not in config:
            config = {"class_name": cls.config_class_name, "config": config}
        return cls._from_config(config, custom_objects=custom_objects)

    def save(self, path, overwrite=True):
        """Save architecture, weights and optimizer state to one file (see ``gpucnn.saving``)."""
        self._require_built("save")
        saving.check_layer_classes(self)  # refused before serialize() warns about the same class
        saving.write_model(self, path, model_config=serialize(self), overwrite=overwrite)

    def save_weights(self, path, overwrite=True):
        """Save the weights alone (an ``.npz`` of float32 arrays, Keras's order); ``overwrite=False`` refuses to
        replace an existing file (FileExistsError; Keras asks)."""
        saving.save_weights(self, path, overwrite=overwrite)

    def load_weights(self, path, skip_mismatch=False):
        """Load weights saved by ``save_weights`` (or ``save``) into this model (every array must fit: Keras's
        ``skip_mismatch=True`` is not supported)."""
        if skip_mismatch:
            raise NotImplementedError("load_weights(skip_mismatch=True) is not supported by gpucnn: every array of "
                                      "the file must fit the model")
        saving.load_weights(self, path)

    def __repr__(self):
        return f"<{type(self).__name__} name={self.name!r}, built={self.built}>"
