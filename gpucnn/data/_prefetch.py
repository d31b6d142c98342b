"""Work ahead of the consumer on background threads, and stop cleanly whatever happens.

- :func:`prefetched` runs a producer (an iterator factory) on one background thread, up to ``depth``
  items ahead of the consumer. An exception the producer raises is raised to the consumer, unchanged
  (the same exception object). When the consumer stops early (``break``, ``close()``, an exception of its
  own, garbage collection) the thread is told to stop, the producer is closed and the thread joined.
- :func:`ordered_map` calls a function over an iterable on a small thread pool, at most ``depth`` calls
  in flight, results in input order; closing it cancels what has not started and joins the pool.

Both are generators: nothing starts before the first ``next()``.
"""

import collections
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

__all__ = ["ordered_map", "prefetched"]

_ITEM, _DONE, _ERROR = "item", "done", "error"
_POLL_S = 0.05  # how often a blocked put or get looks at the stop flag / the thread


def prefetched(produce, depth=2, name="gpucnn-prefetch"):
    """Yield the items of ``produce()``, computed on a background thread up to ``depth`` items ahead."""
    items = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def put(kind, value):
        while not stop.is_set():
            try:
                items.put((kind, value), timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def run():
        source = None
        try:
            source = iter(produce())
            for item in source:
                if not put(_ITEM, item):
                    return
            put(_DONE, None)
        except BaseException as e:  # handed to the consumer, who raises it
            put(_ERROR, e)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # runs the producer's own clean-up (its pools, files) on this thread

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                kind, value = items.get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive() and items.empty():
                    raise RuntimeError(f"the background thread {name} ended without a result") from None
                continue
            if kind == _ITEM:
                yield value
            elif kind == _DONE:
                return
            else:
                raise value
    finally:
        stop.set()
        while thread.is_alive():  # empty the queue so a blocked put sees the stop flag
            try:
                items.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        thread.join()


def ordered_map(fn, iterable, workers, depth=None):
    """``map(fn, iterable)`` on ``workers`` threads (inline when ``workers <= 1``), in input order, with
    at most ``depth`` (default ``2 * workers``) calls submitted ahead; an exception from ``fn`` is raised
    when its result is due."""
    if workers <= 1:
        yield from map(fn, iterable)
        return
    depth = max(int(depth or 2 * workers), 1)
    pending = collections.deque()
    source = iter(iterable)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gpucnn-worker")
    try:
        for arg in source:
            pending.append(pool.submit(fn, arg))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
