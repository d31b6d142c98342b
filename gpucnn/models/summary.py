"""``model.summary()``: Keras 3's table, character for character.

Keras draws it with the ``rich`` library at a width of at most 88 characters for a chain of layers (columns
Layer (type), Output Shape, Param #) and 108 when the graph branches (a fourth column, Connected to), capped by
the terminal's width less 4. The column widths come from fixed fractions of that width; each cell has one space
of padding each side, so the table is narrowed by taking the excess evenly from the columns (rich's
``ratio_reduce``). Cell text wraps at spaces; a word too long for its cell is cut with "…".
"""
import re
import shutil

import numpy as np



def print_summary(model, print_fn, line_length=None, show_trainable=False, positions=None, expand_nested=False,
                  layer_range=None):
    """Keras's table. ``positions``: the columns' right edges (fractions of the width, or Keras's default);
    ``expand_nested``: a nested model's layers in rows under its own, named with Keras's "└ " indent;
    ``layer_range``: (first, last) layer names (regular expressions, both ends kept), as Keras."""
    chain = model.graph.is_chain()
    if chain:
        width, default = 88, (0.45, 0.80, 1.0)
        header = ("Layer (type)", "Output Shape", "Param #")
    else:
        width, default = 108, (0.3, 0.56, 0.74, 1.0)
        header = ("Layer (type)", "Output Shape", "Param #", "Connected to")
    positions = tuple(positions or default)
    align = {2: "right"}
    if show_trainable:  # a centred column more: "Y", "N", or "-" for a layer without weights
        width, positions = width + 12, tuple(p * 0.90 for p in positions) + (1.0,)
        align[len(header)] = "center"
        header += ("Trainable",)
    width = line_length or min(width, shutil.get_terminal_size().columns - 4)
    widths = _column_widths(width, positions)
    rows = []

    def add_rows(owner, layer, level):
        prefix = "   " * level + "└ " if level else ""
        rows.append(_fields(owner, layer, chain, model, prefix) + ([_trainable_mark(layer)] if show_trainable else []))
        if expand_nested and getattr(layer, "graph", None) is not None:
            for inner in layer.layers:
                add_rows(layer, inner, level + 1)

    first, last = _layer_range(model.layers, layer_range)
    for layer in model.layers[first:last]:
        add_rows(model, layer, 0)

    def rule(left, mid, end, ch):
        return left + mid.join(ch * w for w in widths) + end

    lines = [f'Model: "{model.name}"', rule("┏", "┳", "┓", "━")]
    lines += _row_lines(header, widths, align, "┃")
    lines.append(rule("┡", "╇", "┩", "━"))
    for i, row in enumerate(rows):
        lines += _row_lines(row, widths, align, "│")
        lines.append(rule("├", "┼", "┤", "─") if i < len(rows) - 1 else rule("└", "┴", "┘", "─"))
    if not rows:
        lines.append(rule("└", "┴", "┘", "─"))
    trainable = _count(model.trainable_weights)
    non_trainable = _count(model.non_trainable_weights)
    optimizer = getattr(model, "optimizer", None)
    # as Keras, once the optimizer has made its state (the first training step): its values too
    counted = optimizer is not None and optimizer.state is not None
    # (over every weight it holds a state for: those trained now and those frozen since, as Keras counts)
    of_optimizer = optimizer.variable_count(optimizer.held_values()) if counted else 0
    totals = [("Total", trainable + non_trainable + of_optimizer), ("Trainable", trainable),
              ("Non-trainable", non_trainable)] + ([("Optimizer", of_optimizer)] if counted else [])
    for label, n in totals:
        lines.append(f" {label} params: {n:,} ({readable_size(n * 4)})")
    for line in lines:
        print_fn(line)


def _count(weights):
    return int(sum(int(np.prod(w.shape)) for w in weights))


def _class_label(layer):
    """The class Keras names for a layer: a functional model (gpucnn's ``Model``, Keras's ``Functional``) as
    Keras does, every other class (a user's subclass too) by its own name."""
    cls = type(layer)
    return "Functional" if cls.__name__ == "Model" and cls.__module__.startswith("gpucnn.") else cls.__name__


def _fields(owner, layer, chain, model, prefix=""):
    """A layer's row: its name and class, its output shape in ``owner`` (the model that calls it), its parameter
    count, and (not ``chain``) its inputs in the summarised ``model`` ("-" for a nested model's layers, as Keras)."""
    node = next((n for n in owner.graph.nodes if n.layer is layer), None)
    shapes = [t.shape for t in node.outputs] if node is not None else []
    shape = _shape_text(shapes[0]) if len(shapes) == 1 else str([_shape_text(s) for s in shapes]).replace("'", "")
    fields = [f"{prefix}{layer.name} ({_class_label(layer)})", shape, f"{layer.count_params():,}"]
    if not chain:
        fields.append(_connections(model, layer))
    return fields


def _layer_range(layers, layer_range):
    """[first, last + 1) of the layers whose names the two patterns of ``layer_range`` match (re.match: the first
    layer the first matches, the last the second matches), all of them for None — Keras's rule."""
    if layer_range is None:
        return 0, len(layers)
    if len(layer_range) != 2 or not all(isinstance(p, str) for p in layer_range):
        raise ValueError(f"layer_range must be two layer names (strings, regular expressions allowed), got "
                         f"{layer_range!r}")
    lower = [i for i, layer in enumerate(layers) if re.match(layer_range[0], layer.name)]
    upper = [i for i, layer in enumerate(layers) if re.match(layer_range[1], layer.name)]
    if not lower or not upper:
        raise ValueError(f"layer_range {list(layer_range)} does not match the layer names of the model: "
                         f"{[layer.name for layer in layers]}")
    return lower[0], upper[-1] + 1


def _trainable_mark(layer):
    return ("Y" if layer.trainable else "N") if layer.weights else "-"


def _shape_text(shape):
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _connections(model, layer):
    """Keras's "Connected to": ``layer[node index][tensor index]`` for every input of the layer's calls here."""
    parts = []
    here = {id(node) for node in model.graph.nodes}
    for node in layer._inbound_nodes:  # in the order of the calls, as Keras lists them
        if id(node) not in here:
            continue
        for t in node.inputs:
            source = t.node.layer
            parts.append(f"{source.name}[{source._inbound_nodes.index(t.node)}][{t.index}]")
    return ", ".join(parts) if parts else "-"


def _column_widths(width, positions):
    widths, current = [], 0
    for pos in positions:
        w = int(pos * width) - current
        if w < 4:
            raise ValueError("Insufficient console width to print summary.")
        widths.append(w)
        current += w
    cells = [w + 2 for w in widths]  # each cell's padding
    available = width - (len(cells) + 1)  # the borders
    excess = sum(cells) - available
    if excess > 0:
        cells = _ratio_reduce(excess, cells)
    return cells


def _ratio_reduce(total, values):
    """Take ``total`` from ``values`` evenly, in order, rounding each share half to even."""
    result, remaining, ratio = [], total, len(values)
    for value in values:
        share = min(value, round(remaining / ratio))
        result.append(value - share)
        remaining -= share
        ratio -= 1
    return result


def _wrap(text, width):
    """Lines of at most ``width`` characters, broken at spaces; an over-long word cut with "…". Leading spaces (a
    nested layer's indent) stay with the first word, as rich keeps them."""
    lines, line = [], ""
    indent = len(text) - len(text.lstrip(" "))
    words = text[indent:].split(" ")
    words[0] = " " * indent + words[0]
    for word in words:
        if not line:
            line = word
        elif len(line) + 1 + len(word) <= width:
            line += " " + word
        else:
            lines.append(line)
            line = word
    lines.append(line)
    return [ln if len(ln) <= width else ln[:width - 1] + "…" for ln in lines]


def _row_lines(cells, widths, align, border):
    """A row's lines: each cell wrapped to its column, aligned as ``align`` says for its column index ("right",
    "center"; left otherwise; a centred text's odd space goes right, as rich puts it)."""
    wrapped = [_wrap(str(c), w - 2) for c, w in zip(cells, widths)]
    height = max(len(w) for w in wrapped)
    out = []
    for k in range(height):
        parts = []
        for i, (lines, w) in enumerate(zip(wrapped, widths)):
            text = lines[k] if k < len(lines) else ""
            how, room = align.get(i), w - 2
            if how == "right":
                text = text.rjust(room)
            elif how == "center":
                left = (room - len(text)) // 2
                text = (" " * left + text).ljust(room)
            else:
                text = text.ljust(room)
            parts.append(" " + text + " ")
        out.append(border + border.join(parts) + border)
    return out


def readable_size(nbytes):
    size = float(nbytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024:
            return f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} PB"
