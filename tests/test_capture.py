"""gpucnn/models/capture.py without a GPU: a failed capture leaves the process usable (the allocator and the
garbage collector restored, the stream out of capture mode), and a graph is reused only over the very
buffers it was captured with. The stand-in below follows CUDA's rules as CuPy 14 exposes them: an error
that invalidates a capture keeps the stream in capture mode until ``end_capture``, which then raises, and
``is_capturing`` raises for such a stream. Fast-path tests of the same guards: tests/test_fastpath.py
(``test_a_failed_capture_leaves_the_process_usable``, on the GPU and the emulator)."""
import gc
import types

import numpy as np
import pytest

from gpucnn.models import capture


class InjectedError(RuntimeError):
    pass


class StandInStream:
    """A stream with CUDA's capture states: idle, capturing, invalidated."""

    def __init__(self, fail_end=False):
        self.state, self.fail_end, self.ended = "idle", fail_end, 0

    def begin_capture(self):
        assert self.state == "idle", "begin_capture on a stream already capturing"
        self.state = "capturing"

    def is_capturing(self):
        if self.state == "invalidated":
            raise RuntimeError("the stream was capturing, but an error has invalidated the capture sequence")
        return self.state == "capturing"

    def synchronize(self):
        if self.state != "idle":  # cudaErrorStreamCaptureUnsupported, and the capture is invalidated
            self.state = "invalidated"
            raise RuntimeError("cudaErrorStreamCaptureUnsupported")

    def end_capture(self):
        if self.state == "idle":
            raise RuntimeError("cudaErrorIllegalState: not capturing")
        invalidated, self.state = self.state == "invalidated", "idle"  # capture mode ends in every case
        self.ended += 1
        if invalidated:
            raise RuntimeError("cudaErrorStreamCaptureInvalidated")
        if self.fail_end:
            raise InjectedError("graph instantiation failed")
        return "graph"


def stand_in_cupy():
    """get_allocator / set_allocator, and an ``empty`` that goes through the installed allocator."""
    pool = types.SimpleNamespace(malloc=lambda size: None)
    state = {"allocator": pool.malloc}

    def set_allocator(fn=None):
        state["allocator"] = fn or pool.malloc

    def empty(n):
        state["allocator"](n * 4)
        return np.empty(n, np.float32)

    cuda = types.SimpleNamespace(get_allocator=lambda: state["allocator"], set_allocator=set_allocator)
    return types.SimpleNamespace(cuda=cuda, empty=empty, pool=pool)


@pytest.fixture
def gc_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def _usable_after(cupy, stream):
    assert cupy.cuda.get_allocator() is cupy.pool.malloc
    assert gc.isenabled()
    assert not stream.is_capturing() and stream.state == "idle"
    assert cupy.empty(3).shape == (3,)  # later allocations work
    stream.begin_capture()  # and the stream can capture again
    assert stream.end_capture() == "graph"


def test_a_capture_gives_its_graph_and_refuses_allocations_inside(gc_on):
    cupy, stream = stand_in_cupy(), StandInStream()
    with capture.capturing(cupy, stream) as captured:
        assert stream.is_capturing() and not gc.isenabled()
        with pytest.raises(capture.CaptureAllocationError, match="allocated before the capture"):
            cupy.empty(5)
    assert captured.graph == "graph"
    _usable_after(cupy, stream)


@pytest.mark.parametrize("failure", ["launch", "invalidating synchronisation", "interrupt"])
def test_a_failure_inside_the_capture_leaves_the_process_usable(failure, gc_on):
    cupy, stream = stand_in_cupy(), StandInStream()
    raised = {"launch": InjectedError, "invalidating synchronisation": RuntimeError,
              "interrupt": KeyboardInterrupt}[failure]
    with pytest.raises(raised) as info:
        with capture.capturing(cupy, stream):
            if failure == "launch":
                raise InjectedError("a kernel launch failed during the capture")
            if failure == "interrupt":
                raise KeyboardInterrupt
            stream.synchronize()
    assert "cudaErrorStreamCaptureInvalidated" not in str(info.value)  # the original error, not end_capture's
    assert stream.ended == 1
    _usable_after(cupy, stream)


def test_a_failing_end_capture_leaves_the_process_usable(gc_on):
    cupy, stream = stand_in_cupy(), StandInStream(fail_end=True)
    with pytest.raises(InjectedError, match="instantiation"):
        with capture.capturing(cupy, stream) as captured:
            pass
    assert captured.graph is None
    stream.fail_end = False
    _usable_after(cupy, stream)


def test_a_failing_begin_capture_restores_the_allocator_and_gc(gc_on):
    cupy, stream = stand_in_cupy(), StandInStream()
    stream.state = "capturing"  # begin_capture refuses
    with pytest.raises(AssertionError, match="already capturing"):
        with capture.capturing(cupy, stream):
            pass
    assert cupy.cuda.get_allocator() is cupy.pool.malloc and gc.isenabled()


def test_gc_stays_off_after_a_capture_when_it_was_off():
    cupy, stream = stand_in_cupy(), StandInStream()
    was = gc.isenabled()
    gc.disable()
    try:
        with capture.capturing(cupy, stream):
            pass
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


def test_buffer_keys_are_equal_only_over_the_same_live_buffers():
    a, b = np.zeros(4, np.float32), np.zeros(6, np.float32)
    key = capture.buffer_key([a, None, b])
    assert key == capture.buffer_key([a, None, b])
    assert key != capture.buffer_key([a, b])                     # another count
    assert key != capture.buffer_key([a, None, b.copy()])        # a new buffer (same shape and values)
    assert key != capture.buffer_key([b, None, a])               # another order
    assert key != capture.buffer_key([a, a, b])                  # a buffer where there was none
    assert (key, 1) == (capture.buffer_key([a, None, b]), 1)     # inside a tuple, as the fast path keys graphs
    c = np.zeros(3, np.float32)
    key_c = capture.buffer_key([c])
    del c
    gc.collect()
    # a buffer freed after the key was made: no later buffer matches, even one the allocator puts at the
    # freed address (often the case here)
    assert key_c != capture.buffer_key([np.zeros(3, np.float32)])

def test_buffer_keys_read_device_addresses_of_cupy_arrays():
    class DeviceArray:  # what the key reads of a cupy.ndarray: data.ptr and nbytes
        def __init__(self, ptr, nbytes):
            self.data, self.nbytes = types.SimpleNamespace(ptr=ptr), nbytes

    a = DeviceArray(0x7000, 64)
    key = capture.buffer_key([a])
    assert key == capture.buffer_key([a])
    a.data = types.SimpleNamespace(ptr=0x8000)  # the same object over other memory
    assert key != capture.buffer_key([a])
