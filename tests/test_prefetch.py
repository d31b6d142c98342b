"""gpucnn.data._prefetch: work ahead on background threads, in order, stopping cleanly."""

import random
import threading
import time

import pytest

from gpucnn.data._prefetch import ordered_map, prefetched


def _ours():
    return [t for t in threading.enumerate() if t.name.startswith(("gpucnn-", "test-prefetch"))]


def test_items_arrive_in_order_from_another_thread():
    seen = []

    def produce():
        for i in range(20):
            seen.append(threading.current_thread().name)
            yield i

    assert list(prefetched(produce, depth=1, name="test-prefetch")) == list(range(20))
    assert set(seen) == {"test-prefetch"}
    assert _ours() == []


def test_an_exception_reaches_the_consumer_as_the_same_object():
    error = LookupError("broken file")

    def produce():
        yield 1
        raise error

    items = prefetched(produce, name="test-prefetch")
    assert next(items) == 1
    with pytest.raises(LookupError) as info:
        next(items)
    assert info.value is error
    assert _ours() == []


def test_stopping_early_stops_a_blocked_producer_and_runs_its_cleanup():
    cleaned = threading.Event()

    def produce():
        try:
            for i in range(10_000):
                yield i
        finally:
            cleaned.set()

    items = prefetched(produce, depth=2, name="test-prefetch")
    assert next(items) == 0
    time.sleep(0.05)  # the producer fills the queue and blocks
    items.close()
    assert cleaned.is_set() and _ours() == []


def test_ordered_map_keeps_order_and_bounds_the_work_in_flight():
    running, peak, lock = [0], [0], threading.Lock()

    def slow_square(v):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(random.random() / 200)
        with lock:
            running[0] -= 1
        return v * v

    assert list(ordered_map(slow_square, range(30), workers=3, depth=4)) == [v * v for v in range(30)]
    assert 1 <= peak[0] <= 3
    assert _ours() == []


def test_ordered_map_raises_when_the_failed_result_is_due_and_joins_its_pool():
    def fn(v):
        if v == 4:
            raise ValueError("four")
        return v

    got = []
    with pytest.raises(ValueError, match="four"):
        for v in ordered_map(fn, range(10), workers=2):
            got.append(v)
    assert got == [0, 1, 2, 3]
    assert _ours() == []
    assert list(ordered_map(fn, range(3), workers=1)) == [0, 1, 2]  # one worker: inline
