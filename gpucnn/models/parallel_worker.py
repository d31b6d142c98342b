"""The worker process of the NumPy engine's two-process step (``gpucnn.models.parallel``): started as
``python -c "... from gpucnn.models.parallel_worker import serve; serve(fd)"``, it rebuilds the model it is sent
from its config, then computes half-steps into the memory-mapped file it shares with the process that trains."""
import mmap
import signal
import traceback
from multiprocessing.connection import Connection

import numpy as np

from .. import backend, losses, metrics
from .parallel import _arrays, _fixed_slots, exchange_chunks
from .serialization import model_from_config


def serve(fd):
    """The worker's loop (``python -c ...`` started by ``_Worker``): set up models, run half-steps, until the
    pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the other process handles Ctrl-C and stops this one
    conn = Connection(fd)
    backend.set_engine("cpu")
    replica = None  # (model, shared arrays)
    try:
        conn.send(("ready",))
        while True:
            message = conn.recv()
            try:
                if message[0] == "setup":
                    replica = None
                    replica = _replica(*message[1:])
                    reply = ("ok",)
                else:
                    reply = _half_step(replica, conn, *message[1:])
            except Exception:  # noqa: BLE001  (told to the other side, which gives up on the worker)
                reply = ("error", traceback.format_exc())
            conn.send(reply)
    except (EOFError, OSError):  # the other side closed the pipe, or went away: nothing more to do
        return


def _half_step(replica, conn, n, scale, values):
    """The second half of a batch: ``values`` are the random layers' (StepValues.share: Dropout's seeds and
    the images' offset in the batch, the augmentation values of these images), drawn by the other side."""
    model, shared = replica

    def receive():
        message = conn.recv()
        if message[0] != "sums":
            raise RuntimeError(f"expected the other half's sums, got {message[0]!r}")
        return message[1]

    def exchange(mine):  # the other side's half is the batch's first
        return [exchange_chunks(mine, conn.send, receive), mine]

    # as in fit: a diverging run's overflow is reported once, as TrainingDivergedError, by the other side
    with np.errstate(over="ignore", invalid="ignore"):
        loss, correct = model._forward_backward(shared["x"][:n], shared["y"][:n], scale, values, exchange=exchange)
    return ("done", float(loss), int(correct))


def _replica(config, loss, path, layout):
    """The model rebuilt from its config, its weights and gradients views into the shared file."""
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0)
    shared = _arrays(mapped, layout)
    model = model_from_config(config, where="the model sent to the worker process")
    options = {k: v for k, v in loss.items() if k not in ("name", "metrics")}
    model.compile("sgd", losses.LOSSES[loss["name"]](**options),  # the metrics: the form of accuracy to count
                  metrics=[metrics.deserialize(m) for m in loss.get("metrics", [])])
    if model._params.shape != shared["params"].shape:
        raise ValueError(f"the worker's model has {model._params.size} weights, the file "
                         f"{shared['params'].size}")
    model._pack_weights(shared["params"], shared["grads"])
    start = 0
    for layer, i in _fixed_slots(model):  # the other weights: views into the file, which the other process fills
        shape = layer.weights[i].shape
        size = int(np.prod(shape))
        layer.weights[i] = shared["fixed"][start:start + size].reshape(shape)
        start += size
    if start != shared["fixed"].size:
        raise ValueError(f"the worker's model has {start} weights outside training, the file {shared['fixed'].size}")
    return model, shared
