"""Capturing a CUDA graph without leaving the process broken, and knowing when a graph may be replayed.

``capturing(cupy, stream)`` is a context manager around one stream capture: inside it every device
allocation is refused (``CaptureAllocationError``: a graph must only use buffers allocated before it) and
garbage collection is off (without CuPy's pool, a collected array is a ``cudaFree``, an implicit device
synchronisation that a capture does not allow). Whatever raises inside the block or from ``end_capture``
(a launch that failed, a synchronisation that invalidated the capture, a graph the driver cannot
instantiate), the stream leaves capture mode, the previous allocator and the garbage collector come back,
and the exception propagates. Otherwise the block's ``Capture.graph`` is the graph.

A CUDA graph keeps raw device pointers, not the arrays: replayed after one of its buffers was freed, it
reads and writes memory that may belong to something else by then. ``buffer_key(arrays)`` records which
buffers a graph was captured over; it equals a later key exactly when every buffer is still the same live
array at the same device address, so a graph is replayed only over the buffers it was captured with.
"""
import contextlib
import gc
import weakref


class CaptureAllocationError(RuntimeError):
    """Something tried to allocate device memory inside a captured graph."""


def refuse_allocation(size):
    """The allocator installed while capturing (``cupy.cuda.set_allocator``)."""
    raise CaptureAllocationError(
        f"an allocation of {size} bytes inside the captured training step: every buffer must be allocated "
        "before the capture (this is a gpucnn bug)")


class Capture:
    """What ``capturing`` yields; ``graph`` is set once the capture has ended without an error."""

    graph = None


@contextlib.contextmanager
def capturing(cupy, stream):
    """Capture the work issued on ``stream`` inside the ``with`` block as a CUDA graph (the caller makes
    ``stream`` current). ``cupy``: the CuPy module, or a stand-in with ``cuda.get_allocator``,
    ``cuda.set_allocator`` and streams with ``begin_capture``, ``end_capture`` and ``is_capturing``."""
    previous = cupy.cuda.get_allocator()
    collecting = gc.isenabled()
    cupy.cuda.set_allocator(refuse_allocation)
    gc.disable()
    captured = Capture()
    try:
        stream.begin_capture()
        try:
            yield captured
            captured.graph = stream.end_capture()
        except BaseException:
            _leave_capture(stream)
            raise
    finally:
        cupy.cuda.set_allocator(previous)
        if collecting:
            gc.enable()


def _leave_capture(stream):
    """After a failure: end the stream's capture if it is still in one, dropping the graph and any error
    of its own (the original exception says more). CUDA keeps a stream whose capture was invalidated in
    capture mode until ``end_capture``, which then fails; CuPy's ``is_capturing`` raises for such a stream."""
    try:
        active = stream.is_capturing()
    except Exception:  # an invalidated capture: still to be ended
        active = True
    if active:
        try:
            stream.end_capture()
        except Exception:
            pass


# ===================================================================================== graph reuse
def _address(a):
    """The device address of array ``a`` (CuPy), or its data address (the NumPy stand-ins of the tests)."""
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)
    return ptr if ptr is not None else a.__array_interface__["data"][0]


class BufferKey:
    """The buffers a graph was captured over: weak references (the key keeps nothing alive), their
    addresses and sizes. Two keys are equal when they name the same live arrays, in the same order, at the
    same addresses with the same sizes; a key with a buffer that has been freed equals no key."""

    __hash__ = None

    def __init__(self, arrays):
        self._entries = tuple(None if a is None else (weakref.ref(a), _address(a), a.nbytes) for a in arrays)

    def __eq__(self, other):
        if not isinstance(other, BufferKey) or len(self._entries) != len(other._entries):
            return NotImplemented if not isinstance(other, BufferKey) else False
        for mine, theirs in zip(self._entries, other._entries):
            if mine is None or theirs is None:
                if mine is not theirs:
                    return False
                continue
            alive = mine[0]()
            if alive is None or alive is not theirs[0]() or mine[1:] != theirs[1:]:
                return False
        return True


def buffer_key(arrays):
    """A ``BufferKey`` of ``arrays`` (None entries allowed: an optional buffer that is absent)."""
    return BufferKey(arrays)
