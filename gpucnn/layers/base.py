"""The base class of every layer, and the helpers the layers share (argument checks, window geometry, weight
initializers).

A layer knows its configuration, builds its weights once it knows its input shape, and computes with the active
engine's ops (``backend.ops()``):

  * ``forward(x, training, ctx)`` returns the output for a batch and keeps in ``ctx`` what ``backward`` needs;
  * ``backward(dy, ctx)`` returns the input gradient and writes the weight gradients (``weight_grad``).

``ctx`` is a dict that belongs to one *call site* of the layer (one node of a model's graph, at one batch size),
so a layer called twice keeps two contexts, and the engine's work arrays and outputs kept there are reused from
one step to the next. On the CUDA engine every output and gradient lives in such a kept buffer
(``buffer``): a step then allocates nothing, which is what lets the fast path capture the very same step as a
CUDA graph. Merging layers (``Add``, ``Concatenate``) take a list of inputs and return a list of gradients.

Calling a layer (``layer(x)``) on a symbolic tensor (``keras.Input``) builds it and returns a symbolic tensor;
on an array it runs the layer forward in inference mode.
"""
import re

import weakref

import numpy as np

from .. import backend, initializers
from ..engines import numpy_ops
from ..utils import eager, next_name, rng, set_generator_state
from .tensor import KerasTensor, Node, is_symbolic
from .variables import Variable

ACTIVATIONS = (None, "linear") + numpy_ops.ACTIVATIONS  # the names a layer's activation= takes


# ===================================================================================== helpers
def _pair(value, what):
    """An int or a pair of ints → a pair of positive ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    try:
        a, b = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return a, b


def _padding_mode(padding):
    mode = str(padding).lower()
    if mode not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    return mode


def _activation(spec):
    """An activation as the ops take it: None, a name, or a (name, parameter) pair (e.g. ("leaky_relu", 0.3));
    given as None, a name, such a pair (a list, as a saved config holds it), or a function of
    ``gpucnn.activations``. "linear" is None."""
    spec = getattr(spec, "activation_name", spec)  # gpucnn.activations.relu etc.
    if callable(spec) and not isinstance(spec, str):
        raise ValueError(f"activations are given by name (e.g. 'relu', 'sigmoid') or as gpucnn.activations "
                         f"functions, not {spec!r}; gpucnn knows {', '.join(str(a) for a in ACTIVATIONS[1:])}")
    if isinstance(spec, list):
        spec = tuple(spec)
    if spec is None or (isinstance(spec, str) and spec.lower() == "linear"):
        return None
    if isinstance(spec, str):
        spec = spec.lower()
    try:
        name, param = numpy_ops.split_activation(spec)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message.replace(" (or None)", ", or None / 'linear' for none") if message.endswith(
            " (or None)") else message) from None
    return name if not isinstance(spec, tuple) else (name, param)


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def window_geometry(size, k, stride, mode):
    """Keras's output length and (lo, hi) padding for a window k at stride over size.

    "valid": floor((size - k) / stride) + 1, no padding. "same": ceil(size / stride), padded so the
    windows cover it; an odd total pad puts the extra row/column at the bottom/right (as Keras/TF).
    """
    if mode == "valid":
        return (size - k) // stride + 1, (0, 0)
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, (total // 2, total - total // 2)


def _initializer(spec):
    """The initializer ``spec`` names (``gpucnn.initializers.get``: a name, an object or its config)."""
    return initializers.get(spec)


def _snake(class_name):
    """Keras's default-name rule: ``MaxPooling2D`` → ``max_pooling2d``, ``Conv2D`` → ``conv2d``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", class_name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _check_image_input(layer, input_shape):
    if len(input_shape) != 3:
        raise ValueError(
            f"{type(layer).__name__} {layer.name!r} expects images of shape (height, width, channels), "
            f"got per-sample shape {tuple(input_shape)}"
            + (". Grayscale images need a channel axis: reshape to (height, width, 1)."
               if len(input_shape) == 2 else ""))


def _shape_tuple(shape, what, batch_first=False):
    """``shape`` as a tuple of ints (per sample). ``batch_first``: Keras's form with the batch dimension first,
    ``(None, ...)``, is taken too (a layer's ``build``, as Keras's guides call it), that dimension dropped."""
    try:
        dims = tuple(shape)
    except TypeError:
        dims = None
    if (batch_first and dims is not None and len(dims) > 1 and dims[0] is None
            and all(isinstance(d, (int, np.integer)) for d in dims[1:])):
        dims = dims[1:]
    if dims is not None and dims and dims[0] is None and all(isinstance(d, (int, np.integer)) for d in dims[1:]):
        raise ValueError(f"{what} is per sample, without the batch dimension: give {dims[1:]}, not {dims} (a "
                         "layer's build also takes Keras's form, the batch dimension (None) first)")
    if dims is None or not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise ValueError(f"{what} must be a tuple of ints, got {str(shape)[:100]}")
    return tuple(int(d) for d in dims)


class SeededGenerator:
    """For layers that draw randomness (Dropout, the random augmentations): ``seed=`` gives the layer its own
    generator (``generator()``), else it draws from gpucnn's ``rng()``; its state is saved with the model
    (``random_state``/``set_random_state``), so a resumed run draws what the uninterrupted one would."""

    def _seed_generator(self, seed):
        self.seed = seed
        self._seed_rng = None if seed is None else np.random.default_rng(seed)

    def generator(self):
        """Where this layer's draws come from: its own generator (given a seed), else gpucnn's ``rng()``."""
        return self._seed_rng or rng()

    def random_state(self):
        """The state of the layer's own generator (a JSON-able dict), or None when it has none (no seed)."""
        return None if self._seed_rng is None else self._seed_rng.bit_generator.state

    def set_random_state(self, state):
        """Set the layer's own generator to a state ``random_state()`` returned (ValueError if it is not one)."""
        if (state is None) != (self._seed_rng is None):
            raise ValueError(f"{type(self).__name__} {self.name!r} {'has a seed' if self._seed_rng else 'has no seed'}"
                             f"; the random state {str(state)[:100]} does not fit it")
        if state is not None:
            set_generator_state(self._seed_rng, state)


# ===================================================================================== base class
# A weight array a model replaced by a view of its flat buffer (laying its weights out for training), by id, with the
# weight it was: an array a user took before (exclude_from_weight_decay's var_list) still names that weight. Entries
# leave with their array.
_replaced = {}


def remember_replaced(array, layer, i):
    """Note that ``array``, until now weight ``i`` of ``layer``, was replaced (weight_of finds it after)."""
    key = id(array)
    try:
        ref = weakref.ref(array, lambda _, key=key: _replaced.pop(key, None))
    except TypeError:  # (an array type without weak references: nothing to remember it by)
        return
    _replaced[key] = (ref, layer, i)


def weight_of(array):
    """(layer, index) of the weight ``array`` was before a model replaced it (remember_replaced), or None."""
    entry = _replaced.get(id(array))
    return None if entry is None or entry[0]() is not array else entry[1:]


def trainable_flag(value, owner):
    """``value`` as the bool ``trainable`` takes: True or False (NumPy's too, and 1 or 0, which Keras takes as
    them); anything else, say the string "False", which Python would read as true, is refused."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{type(owner).__name__} {owner.name!r}: trainable must be True or False, got {value!r}")



def _policy_name(dtype):
    """The name of a layer's dtype: a NumPy dtype or its name, or as Keras 3 writes it in a layer's config, a
    DTypePolicy dict ({"class_name": "DTypePolicy", "config": {"name": "float32"}}) or an object with a ``name``
    ("mixed_float16" is not float32)."""
    if isinstance(dtype, dict):
        config = dtype.get("config")
        return config.get("name") if isinstance(config, dict) else None
    if isinstance(dtype, str):
        return dtype
    try:
        return np.dtype(dtype).name
    except (TypeError, ValueError):
        return getattr(dtype, "name", None)


class Layer:
    """Base class: name, build, weights (``get_weights``/``set_weights``), forward/backward, calls."""

    multi_input = False  # merging layers take a list of inputs

    # Keras's layer arguments gpucnn takes at their default value only: any other is refused by name
    _KERAS_DEFAULTS = {"kernel_regularizer": None, "bias_regularizer": None, "activity_regularizer": None,
                       "kernel_constraint": None, "bias_constraint": None, "lora_rank": None, "groups": 1,
                       "dilation_rate": (1, 1), "data_format": None, "quantization_config": None,
                       "depthwise_regularizer": None, "pointwise_regularizer": None, "depthwise_constraint": None,
                       "pointwise_constraint": None, "renorm_clipping": None, "renorm_momentum": 0.99}

    def __init__(self, name=None, input_shape=None, trainable=True, dtype=None, input_dim=None, **kwargs):
        cls = type(self)
        if getattr(cls, "forward", None) is Layer.forward and callable(getattr(cls, "call", None)):
            raise NotImplementedError(
                f"{cls.__name__} is a Keras-style layer (it defines call()), which gpucnn cannot run: gpucnn computes "
                "every gradient by hand, layer by layer. Build the computation from gpucnn's layers, or write a layer "
                "of your own as gpucnn's are: a subclass of gpucnn.layers.Layer with _build(input_shape) (its weights, "
                "through add_weight; returns the output shape), forward(x, training, ctx) and backward(dy, ctx) (see "
                "gpucnn/layers/core.py's Dense)")
        for key in [k for k in kwargs if k in self._KERAS_DEFAULTS]:
            value = kwargs.pop(key)
            default = self._KERAS_DEFAULTS[key]
            if key == "dilation_rate" and not isinstance(value, str):
                value = _pair(value, key)
            if not (value == default or (key == "data_format" and value == "channels_last")):
                raise ValueError(f"{type(self).__name__}: gpucnn does not support {key}={value!r} (yet); it takes "
                                 f"Keras's default, {default!r}" + (
                                     " (regularization and constraints are not implemented)"
                                     if "regularizer" in key or "constraint" in key else ""))
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) "
                            f"{', '.join(map(repr, kwargs))}")
        if input_dim is not None:  # Keras's older spelling of input_shape=(input_dim,)
            input_shape = (input_dim,) if input_shape is None else input_shape
        if dtype is not None and _policy_name(dtype) != "float32":
            raise ValueError(f"{type(self).__name__}: gpucnn computes in float32 only, got dtype={dtype!r}")
        self.name = str(name) if name else next_name(_snake(type(self).__name__))
        self.input_shape = None  # per-sample shape (a list of them for merging layers), set by build
        self.output_shape = None
        self._declared_input = tuple(input_shape) if input_shape is not None else None
        self.built = False
        self.weights = []  # engine arrays, in Keras's order (kernel, bias)
        self.grads = []  # same shapes; written by backward
        self.weight_names = []
        self._weight_trainable = []  # per weight: updated by the optimizer (BatchNormalization's moving stats are not)
        self._trainable = trainable_flag(trainable, self)
        self._inbound_nodes = []  # every symbolic call of this layer, in order

    # ---- building
    def build(self, input_shape):
        """Check the per-sample input shape, compute the output shape and create the weights (once: a
        built layer keeps its weights, and refuses an input of another shape). Keras's form with the batch
        dimension, ``layer.build((None, 4))``, is taken too."""
        if self.multi_input:
            shape = [_shape_tuple(s, "input shape", batch_first=True) for s in input_shape]
        else:
            shape = _shape_tuple(input_shape, "input shape", batch_first=True)
        if self.built:
            if shape != self.input_shape:
                raise ValueError(f"layer {self.name!r} was built for inputs {self.input_shape} and cannot "
                                 f"take {shape}; create a new layer for the new shape")
            return self.output_shape
        output_shape = self._build(shape)
        self.input_shape, self.output_shape, self.built = shape, output_shape, True
        return output_shape

    def _build(self, input_shape):
        return input_shape

    def _unbuild(self):
        """Forget a build (the model's build failed further down and will be retried)."""
        self.input_shape = self.output_shape = None
        self.weights, self.grads, self.weight_names, self._weight_trainable = [], [], [], []
        self.built = False

    def _kernel_options(self, activation, use_bias, kernel_initializer, bias_initializer):
        """The options every layer with a kernel and a bias shares (Conv2D, Dense), checked."""
        self.activation = _activation(activation)
        self.use_bias = bool(use_bias)
        _initializer(kernel_initializer), _initializer(bias_initializer)  # unknown names fail here
        self.kernel_initializer, self.bias_initializer = kernel_initializer, bias_initializer

    def _kernel_config(self, kernel_key="kernel_initializer"):
        """The config of ``_kernel_options``: the activation ("linear" for none, as Keras writes it), use_bias and the
        two initializers (a name as given, an object as its config)."""
        return {"activation": "linear" if self.activation is None else self.activation, "use_bias": self.use_bias,
                kernel_key: initializers.serialize(self.kernel_initializer),
                "bias_initializer": initializers.serialize(self.bias_initializer)}

    def _window_output(self, input_shape, window, what, advice):
        """(P, Q, C) of a window of ``window`` at ``self.strides`` with ``self.padding`` over (H, W, C) images, and
        ``self.pads`` set; a "valid" window larger than the input is a clear error (``advice``: how to fix it)."""
        _check_image_input(self, input_shape)
        h, w, c = input_shape
        kh, kw = window
        if self.padding == "valid" and (kh > h or kw > w):
            raise ValueError(f"{type(self).__name__} {self.name!r}: its {kh}x{kw} {what} is larger than its {h}x{w} "
                             f"input. {advice}")
        p, (top, bottom) = window_geometry(h, kh, self.strides[0], self.padding)
        q, (left, right) = window_geometry(w, kw, self.strides[1], self.padding)
        self.pads = (top, bottom, left, right)
        return p, q, c

    def add_weight(self, shape=None, initializer="glorot_uniform", dtype=None, trainable=True, name=None):
        """Keras's add_weight, for a layer of your own (in its ``_build``): a new weight of ``shape``, drawn by
        ``initializer``; returns its values (see ``__getattr__``: ``self.<name>`` reads it later)."""
        if shape is None:
            raise ValueError("add_weight needs a shape")
        if dtype is not None and _policy_name(dtype) != "float32":
            raise ValueError(f"add_weight: gpucnn's weights are float32, got dtype={dtype!r}")
        self._add_weight(str(name) if name else f"weight_{len(self.weights)}", tuple(int(d) for d in shape),
                         initializer, trainable)
        return Variable(self, len(self.weights) - 1)

    def _add_weight(self, name, shape, initializer, trainable=True):
        xp = backend.ops().xp
        value = np.asarray(_initializer(initializer)(shape), dtype=np.float32)
        self.weight_names.append(name)
        self.weights.append(xp.asarray(value))
        self.grads.append(xp.zeros(shape, dtype=np.float32))
        self._weight_trainable.append(bool(trainable))

    # ---- trainability (Keras: a frozen layer's weights are not updated; the change applies at the next step,
    # as in Keras 3's torch and JAX backends: Model._sync_trainable)
    @property
    def trainable(self):
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        self._trainable = trainable_flag(value, self)

    @property
    def trainable_weights(self):
        """The trainable weights as Keras's variables (``Variable``: they follow the layer's current values)."""
        return [Variable(self, i) for i, t in enumerate(self._weight_trainable) if t and self.trainable]

    @property
    def non_trainable_weights(self):
        return [Variable(self, i) for i, t in enumerate(self._weight_trainable) if not (t and self.trainable)]

    @property
    def variables(self):
        """Every weight as Keras's variables (``self.weights`` holds the arrays themselves)."""
        return [Variable(self, i) for i in range(len(self.weights))]

    trainable_variables, non_trainable_variables = trainable_weights, non_trainable_weights

    def __getattr__(self, name):
        """A weight by its Keras name (``layer.kernel``, ``layer.bias``, ``layer.gamma``, ...): a ``Variable``, which
        always reads and writes the layer's current values (training moves the arrays)."""
        names = self.__dict__.get("weight_names", ())
        if name in names:
            return Variable(self, names.index(name))
        attribute = getattr(type(self), name, None)
        if isinstance(attribute, property):  # a property that failed: let its own AttributeError through
            return attribute.fget(self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def count_params(self):
        if not self.built:
            raise ValueError(f"{type(self).__name__} {self.name!r} is not built yet, so it has no weights to count: "
                             "call it on a tensor or an array, or build(input_shape) it first (as Keras says)")
        return int(sum(int(np.prod(w.shape)) for w in self.weights))

    # ---- weights in and out, in Keras's layouts and order
    def get_weights(self):
        """Copies of the weights as NumPy float32 arrays (kernel first, then bias)."""
        return [np.array(backend.to_numpy(w), dtype=np.float32) for w in self.weights]

    def set_weights(self, weights):
        """Set the weights from arrays of exactly the shapes ``get_weights`` returns (all checked before any is
        set)."""
        self._assign_weights(self._checked_weights(weights))

    def _checked_weights(self, weights):
        """``weights`` as the float32 NumPy arrays set_weights would set, after checking their count, shapes and
        values (a ValueError naming the layer and the weight)."""
        weights = list(weights)
        if len(weights) != len(self.weights):
            raise ValueError(f"layer {self.name!r} has {len(self.weights)} weight arrays "
                             f"({', '.join(self.weight_names) or 'none'}), got {len(weights)}")
        checked = []
        for current, name, new in zip(self.weights, self.weight_names, weights):
            new = np.asarray(backend.to_numpy(new))
            if new.shape != tuple(current.shape):
                raise ValueError(f"layer {self.name!r}: {name} must have shape {tuple(current.shape)}, "
                                 f"got {new.shape}")
            if new.dtype.kind not in "biuf" or not np.all(np.isfinite(new)):
                raise ValueError(f"layer {self.name!r}: {name} must be finite numbers")
            new = new.astype(np.float32)
            self._check_weight_values(name, new)
            checked.append(new)
        return checked

    def _check_weight_values(self, name, value):
        """A ValueError when the finite float32 ``value`` cannot be this layer's weight ``name`` (a layer whose
        weights have a range of their own says so: BatchNormalization's moving variance is never negative)."""

    def _assign_weights(self, checked):
        for current, new in zip(self.weights, checked):
            current[...] = backend.ops().xp.asarray(new)  # in place: views stay valid

    # ---- calling
    def __call__(self, inputs, training=None):
        """On symbolic tensors: build the layer, record the call (a graph node, with its ``training`` if given) and
        return symbolic output(s). On arrays: run the layer forward (inference unless ``training``) and return its
        output in host memory on either engine (``utils.eager``: a NumPy array with Keras's ``numpy()``)."""
        if is_symbolic(inputs):
            return self._call_symbolic(inputs, training)
        if self.multi_input:
            if not isinstance(inputs, (list, tuple)):
                raise TypeError(f"{type(self).__name__} {self.name!r} takes a list of arrays, got "
                                f"{type(inputs).__name__}")
            xs = [self._as_engine_array(x) for x in inputs]
            if not self.built:
                self.build([x.shape[1:] for x in xs])
            self._check_call_shapes([x.shape[1:] for x in xs])
            return eager(self.forward(xs, training, {}))
        x = self._as_engine_array(inputs)
        if not self.built:
            self.build(x.shape[1:])
        self._check_call_shapes(x.shape[1:])
        return eager(self.forward(x, training, {}))

    def _as_engine_array(self, x):
        if backend.is_engine_array(x) or isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
            xp = backend.ops().xp
            try:
                return xp.asarray(x, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"layer {self.name!r} ({type(self).__name__}) cannot take {type(x).__name__} "
                                f"input: {exc}") from None
        raise TypeError(f"layer {self.name!r} ({type(self).__name__}) was called on a "
                        f"{type(x).__module__}.{type(x).__name__}; call it on an array (a batch, e.g. NumPy "
                        "(N, 28, 28, 1)) or on a symbolic tensor from keras.Input(shape=...)")

    def _check_call_shapes(self, shapes):
        want = self.input_shape
        got = [tuple(s) for s in shapes] if self.multi_input else tuple(shapes)
        if got != want:
            raise ValueError(f"layer {self.name!r} ({type(self).__name__}) was built for inputs {want} and cannot "
                             f"take {got} (per-sample shapes): a layer keeps the input shape of its first call; "
                             "create a new layer for another shape")

    def _call_symbolic(self, inputs, training=None):
        single = not isinstance(inputs, (list, tuple))
        tensors = [inputs] if single else list(inputs)
        bad = [t for t in tensors if not isinstance(t, KerasTensor)]
        if bad:
            raise TypeError(f"layer {self.name!r} ({type(self).__name__}) was called on a mix of symbolic tensors "
                            f"and {type(bad[0]).__name__}; pass only tensors from keras.Input or from other layers")
        if self.multi_input and single:
            raise TypeError(f"{type(self).__name__} {self.name!r} merges several tensors: call it on a list, "
                            f"e.g. {type(self).__name__}()([x, y])")
        if not self.multi_input and not single:
            if len(tensors) != 1:
                raise TypeError(f"layer {self.name!r} ({type(self).__name__}) takes one tensor, got a list of "
                                f"{len(tensors)}")
            single = True
        shapes = [t.sample_shape for t in tensors]
        outputs = [KerasTensor(self._symbolic_output_shape(shapes if self.multi_input else shapes[0]))]
        node = Node(self, tensors, outputs, single=single, training=training)
        self._inbound_nodes.append(node)
        return outputs[0]

    def _symbolic_output_shape(self, in_shape):
        """The per-sample output shape of a call on inputs of per-sample shape ``in_shape`` (building the layer
        on its first call)."""
        if self.built:
            self._check_call_shapes(in_shape)
            return self.output_shape
        return self.build(in_shape)

    # ---- the graph view (Keras: the tensors of the layer's first call)
    def _first_node(self, what):
        if not self._inbound_nodes:
            raise AttributeError(f"layer {self.name!r} has no {what} yet: it has not been called on a symbolic "
                                 "tensor (build a model with keras.Input(...) or give input_shape=... to the "
                                 "first layer of a Sequential)")
        return self._inbound_nodes[0]

    @property
    def input(self):
        node = self._first_node("input")
        return node.inputs[0] if node.single else list(node.inputs)

    @property
    def output(self):
        return self._first_node("output").outputs[0]

    # ---- computing
    def forward(self, x, training, ctx):
        """Outputs for a batch; keeps in ``ctx`` what ``backward`` needs."""
        raise NotImplementedError

    def backward(self, dy, ctx):
        """The input gradient for output gradient ``dy``; the weight gradients go to ``weight_grad(i, ctx)``.
        ``ctx["need_dx"]`` False: no input gradient is needed (return None). The returned array may be a work
        array of the engine, valid until this call site's next backward."""
        raise NotImplementedError

    # ---- helpers for forward/backward
    @staticmethod
    def buffer(ctx, key, shape, dtype=np.float32):
        """An output array kept in ``ctx`` for this call site (on engines that want ``out=`` buffers: CUDA),
        else None (the NumPy op allocates its result)."""
        ops = backend.ops()
        if not ops.OUT_BUFFERS:
            return None
        shape = tuple(int(d) for d in shape)
        kept = ctx.get(("buffer", key))
        if kept is None or kept.shape != shape or kept.dtype != dtype:
            kept = ctx[("buffer", key)] = ops.xp.empty(shape, dtype)
        return kept

    def _forward_activation(self, ctx):
        """(activation the op fuses, activation this layer applies after it) for a call: the output layer under a
        loss that takes the logits applies none (``ctx["skip_activation"]``); an activation whose gradient needs
        its input (silu, gelu) is applied after the op, which then keeps that input, ``ctx["z"]``."""
        act = None if ctx.get("skip_activation") else self.activation
        if act is not None and numpy_ops.activation_needs_input(act):
            return None, act
        return act, None

    def _activate(self, z, after, ctx):
        """The layer's output from the op's output ``z`` (``after``: the activation applied here, or None)."""
        if after is None:
            return z
        ctx["z"] = z
        return backend.ops().activation_forward(z, after, out=self.buffer(ctx, "y_act", z.shape))

    def _activation_grad(self, dy, ctx):
        """The gradient at the op's output from the gradient ``dy`` at the layer's output."""
        act = None if ctx.get("skip_activation") else self.activation
        if act is None:
            return dy
        return backend.ops().activation_backward(dy, ctx["y"], act, out=self.buffer(ctx, "dz", dy.shape),
                                                 x=ctx.get("z"))

    def bias_grad(self, i, size, ctx):
        """Where the gradient of the bias (weight ``i``, ``size`` values) goes: ``weight_grad(i)``, or, for a
        layer without a bias, a kept scratch buffer (the ops always write one)."""
        return self.weight_grad(i, ctx) if self.use_bias else self.buffer(ctx, "db", (size,))

    def weight_grad(self, i, ctx):
        """Where this call's gradient of weight ``i`` goes: the layer's gradient array, or, when the step adds
        several calls' gradients (a layer called twice), this call's own buffer (``ctx["accumulate"]``)."""
        if not ctx.get("accumulate"):
            return self.grads[i]
        key = ("grad", i)
        kept = ctx.get(key)
        if kept is None or kept.shape != self.grads[i].shape:
            kept = ctx[key] = backend.ops().xp.zeros(self.grads[i].shape, np.float32)
        return kept

    def get_config(self):
        config = {"name": self.name}
        if not self.trainable:
            config["trainable"] = False
        return config

    @classmethod
    def from_config(cls, config):
        """The layer ``get_config()`` describes (unbuilt, as Keras's)."""
        return cls(**config)

    def __repr__(self):
        return f"<{type(self).__name__} name={self.name!r}>"
