"""``Sequential``: a stack of layers, each taking the previous one's output — a functional graph built for you.

    model = Sequential([layers.Conv2D(32, 3, activation="relu", input_shape=(28, 28, 1)), ...])
    model = Sequential([keras.Input(shape=(28, 28, 1)), layers.Conv2D(32, 3), ...])
    model.add(layers.Dense(10, activation="softmax"))

Once the input shape is known (``input_shape=`` on the first layer, an ``Input`` first, ``build()``, or the first
data), the model calls each layer on the previous layer's output, as Keras does: every layer is then built, the
model has ``inputs``/``outputs``, and ``layer.output`` works. ``layers`` lists the layers without the InputLayer
(as in Keras).
"""
from ..layers import InputLayer, KerasTensor, Layer
from ..layers.core import Input
from ..utils import next_name
from .graph import Graph
from .model import Model, serialize


def _known_input_shape(layer):
    """The per-sample input shape a first layer brings: its ``input_shape=``, or, for a built model of one input
    (a base model in the transfer-learning idiom ``Sequential([base_model, ...])``), that input's shape, with
    which Keras builds the Sequential at once."""
    if getattr(layer, "_declared_input", None) is not None:
        return layer._declared_input
    if isinstance(layer, Model) and layer.built and len(layer.graph.inputs) == 1:
        return tuple(layer.graph.inputs[0].sample_shape)
    return None


class Sequential(Model):
    """A linear stack of layers: ``Sequential([Conv2D(...), MaxPooling2D(), ...])`` or ``.add()``."""

    config_class_name = "Sequential"

    def __init__(self, layers=None, name=None, trainable=True):
        self._init_model(name or next_name("sequential"), trainable)
        self._layers = []
        self._input = None  # the Input tensor, once the input shape is known
        self._output = None
        self._inputs_were_list = self._outputs_were_list = False  # one input, one output (calls return an array)
        if layers is not None and not isinstance(layers, (list, tuple)):
            raise TypeError(f"Sequential takes a list of layers, got {type(layers).__name__}")
        self._quiet = False
        self._add_all(layers or [])

    def _add_all(self, layers):
        """Add ``layers`` as one (re)build: Keras's Sequential rebuilds once after them (``_rebuilt``)."""
        self._quiet = True
        try:
            for layer in layers:
                self.add(layer)
        finally:
            self._quiet = False
        self._rebuilt()

    def _rebuilt(self):
        """Keras's Sequential makes a Functional model inside it each time it is (re)built — once its input shape
        is known: at the end of the constructor, at each later add and pop, when built from data — which takes a
        default name ("functional", "functional_1", ...). Spend one likewise, so that the models made after get
        Keras's default names."""
        if self.graph is not None:
            next_name("functional")

    @property
    def layers(self):
        return list(self._layers)

    # ================================================================================= building
    def add(self, layer):
        """Append a layer (built at once when the model's input shape is known, as in Keras)."""
        if isinstance(layer, KerasTensor) and layer.node is not None and isinstance(layer.node.layer, InputLayer):
            self._set_input(layer)
            return self
        if isinstance(layer, InputLayer):
            self._set_input(layer.output)
            return self
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential.add takes a gpucnn layer (or keras.Input first), got {layer!r}")
        if layer is self:
            raise ValueError("a model cannot contain itself")
        if any(existing is layer for existing in self._layers):
            raise ValueError(f"layer {layer.name!r} is already in this model: a Sequential model runs each layer "
                             "object once. For another layer like it, create a new one (e.g. layers.Dense(64)); to "
                             "apply one layer twice with the same weights, use the functional API (call it on two "
                             "tensors)")
        if any(existing.name == layer.name for existing in self._layers):
            raise ValueError(f"the model already has a layer named {layer.name!r}; layer names must be "
                             "unique (pass name=... to tell them apart)")
        known = _known_input_shape(layer) if not self._layers and self._input is None else None
        if known is not None:
            self._input = Input(shape=known)
            self._output = self._input
        self._layers.append(layer)
        if self._input is not None:
            fresh = not layer.built
            try:
                output = layer(self._output)
            except Exception:
                self._layers.pop()
                raise
            if fresh:  # built here: its weights' paths start with this model's name, as Keras's do
                layer._path_prefix = f"{self.name}/"
            self._output = output
            self._set_graph(Graph([self._input], [self._output], owner=f"Sequential {self.name!r}"))
            if not self._quiet:
                self._rebuilt()
        return self

    def pop(self):
        """Remove the last layer (the graph is built again) and return it, as Keras does."""
        if not self._layers:
            raise TypeError("there are no layers in the model")
        layers, removed = self._layers[:-1], self._layers[-1]
        shape = None if self._input is None else self._input.sample_shape
        self._layers, self._input, self._output, self.graph, self.built = [], None, None, None, False
        if shape is not None:
            self._set_input(Input(shape=shape))
        self._add_all(layers)
        return removed

    def _set_input(self, tensor):
        if self._layers or self._input is not None:
            raise ValueError("an Input must be the first element of a Sequential model")
        self._input = self._output = tensor

    def build(self, input_shape=None):
        """Build every layer. ``input_shape`` is Keras's: it starts with the batch dimension, e.g.
        ``(None, 28, 28, 1)``; without it, the shape given to the first layer is used."""
        if input_shape is not None:
            requested = tuple(input_shape)
            if len(requested) < 2:
                raise ValueError(f"build() takes a shape with the batch dimension first, e.g. (None, 28, 28, 1); "
                                 f"got {requested}")
            self._build_for_data(tuple(requested[1:]), given=requested)
            return
        if self.built:
            return
        if self._input is None:
            raise ValueError("the model does not know its input shape yet: give the first layer "
                             "input_shape=(28, 28, 1), start with keras.Input(shape=...), or call fit()")
        if not self._layers:
            raise ValueError("the model has no layers")

    def _build_for_data(self, sample_shape, given=None):
        """Build the model for per-sample inputs of ``sample_shape`` when it does not know its input shape yet;
        a built model refuses another shape."""
        sample_shape = tuple(int(d) for d in sample_shape)
        if self.built:
            if given is not None and sample_shape != self._input.sample_shape:
                raise ValueError(f"the model is built for inputs {self._input.sample_shape}, not {sample_shape}; "
                                 "build a new model for another input shape")
            return
        if not self._layers:
            raise ValueError("the model has no layers")
        if self._input is not None and sample_shape != self._input.sample_shape:
            raise ValueError(f"the model expects inputs {self._input.sample_shape}, not {sample_shape}")
        layers = self._layers
        fresh = [layer for layer in layers if not layer.built]
        self._layers = []
        self._input = self._output = Input(shape=sample_shape)
        try:
            self._add_all(layers)
        except Exception as exc:
            for layer in fresh:  # a later call with a corrected shape starts clean
                if layer.built:
                    layer._unbuild()
            self._layers, self._input, self._output, self.graph, self.built = layers, None, None, None, False
            if given is not None and given[0] is not None:
                raise type(exc)(f"{exc}. (build() takes the batch dimension first: for samples of shape "
                                f"{tuple(given)} write model.build({(None,) + tuple(given)}))") from exc
            raise

    def _require_built(self, what):
        if not self.built:
            if self._input is None:
                raise ValueError(f"{what}: the model has not been built yet. Give the first layer "
                                 "input_shape=..., call model.build((None, 28, 28, 1)) with your shape, or fit it "
                                 "first.")
            self.build()

    @property
    def input_shape(self):
        return None if self._input is None else self._input.shape

    # Keras 3: a Sequential called in another model answers ``input`` and ``output`` with the tensors of its first
    # call there, as any layer does, so ``[layer.output for layer in model.layers]`` stays in the outer graph (an
    # activation model of the book's augmented convnet); one never called answers with its own graph's
    # (``inputs`` and ``outputs`` always do).
    @property
    def input(self):
        return Layer.input.fget(self) if self._inbound_nodes else super().input

    @property
    def output(self):
        return Layer.output.fget(self) if self._inbound_nodes else super().output

    def get_config(self):
        self._refuse_layers_shared_with_nested_models()
        return {"name": self.name, "input_shape": None if self._input is None else list(self._input.sample_shape),
                "layers": [serialize(layer) for layer in self._layers], **({} if self._trainable else {"trainable": False})}
