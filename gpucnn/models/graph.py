"""The graph of a model: the nodes between its input and output tensors, in an order that computes every tensor
before it is used, and the one forward and backward that every engine — and the CUDA graph capture — runs.

A node is one call of a layer (``gpucnn.layers.tensor.Node``). ``Graph(inputs, outputs)`` walks back from the
outputs to the inputs, keeps the nodes on the way, and refuses graphs whose outputs do not come from its inputs.
Two orders come from the graph's structure alone (not from the order in which the layers were called, so a model
rebuilt from its config runs and lists exactly as the original):
  * ``nodes``, the order the nodes run in: depth-first from the outputs, in order, each node after the nodes that
    make its inputs (in the order of its inputs) — the traversal Keras's functional models make;
  * ``layers``, Keras's ``model.layers`` order, which ``get_weights``, ``summary`` and the saved files follow: by
    depth (the longest path to an output) from the inputs' down to the outputs', layers of equal depth in the
    order the traversal first reached them; a layer called several times counts at its greatest depth.

``forward`` and ``backward`` run the nodes with one context dict per node (``Contexts``): what a layer keeps
between its forward and backward, and the engine's buffers for that call site. In training, a Conv2D whose
output goes only into a 2x2 max-pooling runs with it as one op (``layers.ConvPool``); in inference, a Conv2D without an
activation whose output goes only into a BatchNormalization runs as one convolution with the normalization folded in
(``layers.ConvBN``). A tensor read by several
nodes gets the sum of their gradients; a layer called several times gets the sum of its calls' weight gradients.
"""
import numpy as np

from .. import backend
from ..layers import ConvBN, ConvPool, InputLayer, KerasTensor, fusable_bn, fusable_pool


class Graph:
    """The nodes from ``inputs`` to ``outputs`` (lists of KerasTensors) and how to run them."""

    def __init__(self, inputs, outputs, owner="the model"):
        self.inputs, self.outputs = list(inputs), list(outputs)
        for t in self.inputs:
            if not isinstance(t, KerasTensor) or t.node is None or not isinstance(t.node.layer, InputLayer):
                raise ValueError(f"{owner}: every input must be a tensor made by keras.Input(...), got {t!r}")
        for t in self.outputs:
            if not isinstance(t, KerasTensor):
                raise ValueError(f"{owner}: every output must be a symbolic tensor (what calling a layer on "
                                 f"keras.Input returns), got {type(t).__name__}")
        if len({t.id for t in self.inputs}) != len(self.inputs):
            raise ValueError(f"{owner}: the same input tensor is listed twice")
        input_ids = {t.id for t in self.inputs}
        nodes, seen, stack = [], set(), list(self.outputs)
        while stack:  # every node an output depends on
            t = stack.pop()
            node = t.node
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            nodes.append(node)
            if isinstance(node.layer, InputLayer) and t.id not in input_ids:
                raise ValueError(
                    f"{owner}: its outputs depend on the input {node.layer.name!r} (shape {t.shape}), which is not "
                    "among its inputs; pass it in inputs=[...], or build the outputs from the given inputs")
            stack.extend(node.inputs)
        used = {id(n) for n in nodes}
        unused = [t for t in self.inputs if id(t.node) not in used]
        if unused:
            raise ValueError(f"{owner}: the outputs do not depend on the input {unused[0].node.layer.name!r}; every "
                             "input must lead to an output")
        self.nodes, first_seen = _traversal(self.outputs)
        self.layers = _keras_layer_order(self.nodes, first_seen)
        self.consumers = {}  # tensor id -> the nodes of this graph that read it
        for node in self.nodes:
            for t in node.inputs:
                self.consumers.setdefault(t.id, []).append(node)
        self._plans = {}

    # --------------------------------------------------------------------------------- planning
    def is_chain(self):
        """Whether the graph is one line of single-input layers, each called once (Keras's "sequential-like"):
        then ``summary`` has no "Connected to" column."""
        compute = [n for n in self.nodes if not isinstance(n.layer, InputLayer)]
        if len(self.inputs) != 1 or len(self.outputs) != 1 or len(compute) != len(self.layers) - 1:
            return False
        previous = self.inputs[0]
        for node in compute:
            if len(node.inputs) != 1 or node.inputs[0] is not previous:
                return False
            previous = node.outputs[0]
        return previous is self.outputs[0]

    def steps(self, training):
        """The nodes as a forward pass runs them: tuples ``(node,)``, or ``(first, second)`` for two layers run as
        one op (``fused``: a Conv2D and the 2x2 max-pooling that alone reads it, in training; a Conv2D and the
        BatchNormalization that alone reads it, in inference)."""
        if training not in self._plans:
            output_ids = {t.id for t in self.outputs}
            compute = [n for n in self.nodes if not isinstance(n.layer, InputLayer)]
            steps, skip = [], set()
            for node in compute:
                if id(node) in skip:
                    continue
                readers = self.consumers.get(node.outputs[0].id, [])
                if (len(readers) == 1 and node.outputs[0].id not in output_ids
                        and (training is not None or node.training is None and readers[0].training is None)
                        and fused(node.layer, readers[0].layer, training) is not None):
                    steps.append((node, readers[0]))
                    skip.add(id(readers[0]))
                else:
                    steps.append((node,))
            self._plans[training] = steps
        return self._plans[training]

    def needs_gradient(self, inputs_need=False):
        """{tensor id: whether its gradient is needed}: tensors that depend on a trainable weight (or on the
        inputs, when ``inputs_need``: a model nested in another that needs its input gradient)."""
        needs = {t.id: bool(inputs_need) for t in self.inputs}
        for node in self.nodes:
            if isinstance(node.layer, InputLayer):
                continue
            flag = len(node.layer.trainable_weights) > 0 or any(needs.get(t.id, False) for t in node.inputs)
            for t in node.outputs:
                needs[t.id] = flag
        return needs

    # --------------------------------------------------------------------------------- running
    def forward(self, xs, training, contexts):
        """The outputs (a list) for inputs ``xs`` (a list of engine arrays, one per input). With inference-only
        contexts (``Contexts(shared_work=True)``) nothing is kept for a backward pass: each tensor is let go once
        its last reader has run, and what the layers keep in their contexts once they have run."""
        values = {t.id: x for t, x in zip(self.inputs, xs)}
        steps = self.steps(training)
        release = contexts.shared_work is not None
        if release:
            reads = [[step[0].inputs[0]] if len(step) == 2 else step[0].inputs for step in steps]
            left = {}
            for tensors in reads:
                for t in tensors:
                    left[t.id] = left.get(t.id, 0) + 1
            keep = {t.id for t in self.outputs}
        for k, step in enumerate(steps):
            if len(step) == 2:
                first, second = step
                values[second.outputs[0].id] = fused(first.layer, second.layer, training).forward(
                    values[first.inputs[0].id], training, contexts[first], contexts[second])
            else:
                node = step[0]
                args = [values[t.id] for t in node.inputs]
                mode = node.training if training is None and node.training is not None else training
                values[node.outputs[0].id] = node.layer.forward(args[0] if node.single else args, mode,
                                                                contexts[node])
            if release:
                for node in step:
                    contexts.release(node)
                for t in reads[k]:
                    left[t.id] -= 1
                    if not left[t.id] and t.id not in keep:
                        values.pop(t.id, None)
        return [values[t.id] for t in self.outputs]

    def backward(self, douts, contexts):
        """Backward from the output gradients ``douts`` (a list; None where an output has no loss) to the weight
        gradients; returns the gradients of the inputs (None where not needed)."""
        ops = backend.ops()
        grads = {}
        for t, d in zip(self.outputs, douts):
            if d is not None:
                self._add_gradient(grads, t, d, contexts, ops)
        for step in reversed(self.steps(True)):
            last = step[-1]
            dy = grads.pop(last.outputs[0].id, None)
            if dy is None:
                continue
            first = step[0]
            if len(step) == 2:
                dxs = [fused(first.layer, last.layer, True).backward(dy, contexts[first], contexts[last])]
            else:
                dx = first.layer.backward(dy, contexts[first])
                dxs = dx if first.layer.multi_input else [dx]
            for node in step:
                self._add_weight_grads(node, contexts[node], ops)
            for t, dx in zip(first.inputs, dxs):
                if dx is not None and contexts.needs[t.id]:
                    self._add_gradient(grads, t, dx, contexts, ops)
        return [grads.get(t.id) for t in self.inputs]

    @staticmethod
    def _add_gradient(grads, t, d, contexts, ops):
        if t.id not in grads:
            grads[t.id] = d
            return
        kept = contexts.buffer(("sum", t.id), d.shape) if ops.OUT_BUFFERS else None
        grads[t.id] = ops.add(grads[t.id], d, out=kept)

    @staticmethod
    def _add_weight_grads(node, ctx, ops):
        if ctx.get("accumulate"):
            for i, g in enumerate(node.layer.grads):
                kept = ctx.get(("grad", i))  # none for a weight no gradient reaches (moving statistics)
                if kept is not None:
                    ops.add(g, kept, out=g)


def fused(first, second, training):
    """The op that runs layer ``first`` and ``second``, the one layer that reads its output, as one step (None when
    they run apart): ``ConvPool`` in training, ``ConvBN`` in inference."""
    if training and fusable_pool(first, second):
        return ConvPool(first, second)
    if not training and fusable_bn(first, second):
        return ConvBN(first, second)
    return None


def _traversal(outputs):
    """(nodes, first_seen): every node the outputs depend on, depth-first from the outputs in order, each after the
    nodes that make its inputs (a topological order); and {id(layer): when the traversal first reached one of its
    nodes}."""
    order, finished, first_seen = [], set(), {}
    for output in outputs:
        stack = [(output.node, False)]
        while stack:
            node, inputs_done = stack.pop()
            if id(node) in finished:
                continue
            if inputs_done:
                finished.add(id(node))
                order.append(node)
                continue
            first_seen.setdefault(id(node.layer), len(first_seen))
            stack.append((node, True))
            stack.extend((t.node, False) for t in reversed(node.inputs))  # the first input is taken first
    return order, first_seen


def _keras_layer_order(nodes, first_seen):
    """The layers of ``nodes`` (a topological order) as Keras lists a functional model's: by depth, deepest (the
    inputs') first, ties in ``first_seen`` order. A node's depth is 0 at the outputs and one more than the deepest
    node that reads it; a layer takes the greatest depth of its nodes (as do the nodes of a shared layer)."""
    node_depth, layer_depth, layers = {}, {}, {}
    for node in reversed(nodes):
        depth = max(node_depth.get(id(node), 0), layer_depth.get(id(node.layer), 0))
        node_depth[id(node)] = layer_depth[id(node.layer)] = depth
        layers[id(node.layer)] = node.layer
        for t in node.inputs:
            node_depth[id(t.node)] = max(node_depth.get(id(t.node), 0), depth + 1)
    return sorted(layers.values(), key=lambda layer: (-layer_depth[id(layer)], first_seen[id(layer)]))


class Contexts(dict):
    """The context dicts of a graph's nodes at one batch size: ``contexts[node]``. Set up once per (graph, batch
    size): whether each node needs its input gradient, which calls of a shared layer add their weight gradients to
    another's, and the step values (``step``: Dropout's seed table and the step counter)."""

    def __init__(self, graph, step=None, skip_output_activation=False, inputs_need=False, shared_work=False,
                 written_before=()):
        super().__init__()
        self.step = step
        # ``shared_work`` (inference: nothing is kept for a backward pass): every node's ops share one work dict,
        # one array per shape, instead of each keeping its own — a large batch's predict holds a few layers' work
        # arrays, not every layer's
        self.shared_work = {backend.ops().SHARED_WORK: True} if shared_work else None
        self.needs = graph.needs_gradient(inputs_need)
        output_nodes = {id(t.node) for t in graph.outputs}
        # the layers whose gradient a later node (earlier in backward) already writes; a nested model's graph starts
        # from those its outer graph's later nodes write (``written_before``: a model called twice, or a layer called
        # inside a nested model and outside it, adds its second call's gradients instead of overwriting the first's)
        written = set(written_before)
        for step_nodes in reversed(graph.steps(True)):
            for node in reversed(step_nodes):
                self._context(node, step, written, skip_output_activation and id(node) in output_nodes)
        for node in graph.nodes:  # nodes only inference runs (none today), and the inputs
            if node not in self:
                self._context(node, step, written, False)

    def _context(self, node, step, written, skip_activation):
        ctx = {"need_dx": any(self.needs.get(t.id, False) for t in node.inputs), "step": step}
        if self.shared_work is not None:
            ctx["ops"] = self.shared_work
        if skip_activation:
            ctx["skip_activation"] = True
        inner = getattr(node.layer, "_all_layers", None)  # a nested model: its own layers write the gradients
        if inner is not None:
            ctx["written_before"] = frozenset(written)
            written.update(id(layer) for layer in inner())
        elif id(node.layer) in written:
            ctx["accumulate"] = True
        written.add(id(node.layer))
        self[node] = ctx

    _KEPT = ("need_dx", "step", "skip_activation", "accumulate", "inner", "written_before")

    def release(self, node):
        """Drop what ``node``'s layer kept in its context for a backward pass (its input, output, masks...), keeping
        the context's setup, its work arrays and its out= buffers (inference: no backward comes)."""
        ctx = self[node]
        for key in [k for k in ctx if not self._kept(k)]:
            del ctx[key]

    def _kept(self, key):
        """Whether ``release`` keeps a context entry: the setup, work dicts ("ops", "ops_depthwise", ...: the engine's
        work arrays) and out= buffers."""
        return (key in self._KEPT or (isinstance(key, str) and key.startswith("ops"))
                or (isinstance(key, tuple) and key[0] == "buffer"))

    def buffer(self, key, shape, dtype=np.float32):
        kept = self.get(key)
        if kept is None or kept.shape != tuple(shape):
            kept = self[key] = backend.ops().xp.empty(tuple(shape), dtype)
        return kept


def _value_spec(layer):
    """(K, dtype) of a random layer's per-image step values (an augmentation layer), or None (a layer that
    draws one seed per step: Dropout)."""
    spec = getattr(layer, "step_value_spec", None)
    return None if spec is None else spec()


class StepValues:
    """The values a training step reads from engine memory rather than from its arguments (so a captured CUDA
    graph reads new ones at every replay): ``counter`` ((1,) int32, the step's row), ``seeds`` ((rows, slots)
    uint64: one seed per step and random layer, e.g. Dropout), and for each random augmentation layer a table
    (rows, images, K) of its per-image values (``table(layer)``: flip flags, transforms, contrast factors).
    All are drawn on the host, step by step and layer by layer in the graph's order (``fill``). An eager step
    uses one row, counter 0, its tables sized to each batch; the fast path's are sized once (``batch``), as its
    captured graphs read them by address."""

    def __init__(self, random_layers, rows=1, xp=None, batch=None):
        self.xp = xp or backend.ops().xp
        self.layers = list(random_layers)
        self.rows, self.batch = rows, batch
        self._slots = {id(layer): i for i, layer in enumerate(self.layers)}
        self.seeds = self.xp.zeros((rows, max(1, len(self.layers))), np.uint64)
        self.counter = self.xp.zeros(1, np.int32)
        self.tables = {}
        self.offset = 0  # images of the whole batch before this one's first (a half batch of the two-process step)
        # the two-process step's exchange of per-channel sums with the other half (BatchNormalization's
        # statistics; see engines' batchnorm_forward_training), None when the batch is whole
        self.exchange = None
        if batch is not None:
            for layer in self._augmenting():
                self._table(layer, batch)

    def slot(self, layer):
        return self._slots[id(layer)]

    def table(self, layer):
        """The (rows, images, K) engine table of an augmentation layer's per-image values, or None."""
        return self.tables.get(id(layer))

    def _augmenting(self):
        return [layer for layer in self.layers if _value_spec(layer) is not None]

    def _table(self, layer, images):
        width, dtype = _value_spec(layer)
        table = self.tables.get(id(layer))
        if table is None or table.shape[1] != images:
            table = self.tables[id(layer)] = self.xp.zeros((self.rows, images, width), dtype)
        return table

    def fill(self, sizes):
        """Draw the next ``len(sizes)`` steps' values on the host (step by step, layer by layer: each layer's
        seed, or its values for ``sizes[r]`` images) into rows 0.. of the engine arrays; the rows after them
        are zero."""
        self.load(self.draw(sizes))

    def draw(self, sizes):
        """The host values ``fill`` loads: {"seeds": (rows, slots) uint64, "tables": [per layer: (rows,
        images, K) or None]}, drawn in order."""
        if len(sizes) > self.rows:
            raise ValueError(f"StepValues.fill: {len(sizes)} steps do not fit {self.rows} rows")
        images = max(sizes) if self.batch is None else self.batch
        seeds = np.zeros(self.seeds.shape, np.uint64)
        tables = [None if spec is None else np.zeros((self.rows, images, spec[0]), spec[1])
                  for spec in map(_value_spec, self.layers)]
        for r, n in enumerate(sizes):
            for i, layer in enumerate(self.layers):
                if tables[i] is not None:
                    tables[i][r, :n] = layer.step_values(n)
                else:
                    seeds[r, i] = layer.next_seed()
        return {"seeds": seeds, "tables": tables}

    def share(self, host, first):
        """The part of ``draw``'s values that images ``first``.. of the batch read: the tables' rows from
        that image on, the same seeds, and ``offset`` = first (Dropout's masks of those images)."""
        return {"seeds": host["seeds"], "offset": first,
                "tables": [None if t is None else t[:, first:] for t in host["tables"]]}

    def load(self, host, row=None):
        """Put ``draw``'s (or ``share``'s) host values into the engine arrays; with ``row``, their first row
        into that row (a step whose batch, and so its size, arrives with it)."""
        self.offset = int(host.get("offset", 0))
        if row is None:
            self.seeds[...] = self.xp.asarray(host["seeds"])
        else:
            self.seeds[row] = self.xp.asarray(host["seeds"][0])
        for layer, table in zip(self.layers, host["tables"]):
            if table is None:
                continue
            if row is None:
                self._table(layer, table.shape[1])[...] = self.xp.asarray(table)
            else:
                self.tables[id(layer)][row, :table.shape[1]] = self.xp.asarray(table[0])
