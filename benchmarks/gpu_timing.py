"""Timing GPU work with CUDA events, without timing Python.

A kernel of the seed model at batch 64 runs for a few microseconds, about as long as Python takes to launch
it; events recorded around one call on an idle GPU would measure the launch, not the kernel. So each timed
group is queued behind a short spin kernel: while the GPU spins, the host enqueues the group (start event,
``reps`` calls, end event), and the calls then run back to back. The group's event time over ``reps`` is
the GPU time of one call. If the host took longer to enqueue than the spin lasted (the GPU went idle),
the group is measured again with a longer spin, so no reported number includes host time.

Every call runs on CuPy's current stream; PyTorch work must be on that same stream (``same_stream``).
"""
import statistics
import time

import numpy as np

_SPIN_SOURCE = r"""
extern "C" __global__ void spin_ns(unsigned long long ns) {
    // Busy-waits on the GPU's nanosecond timer: keeps the stream busy while the host enqueues work.
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""
_spin = {}
_MAX_SPIN_NS = 200_000_000  # 0.2 s: a group that needs more to enqueue is timed as it comes


def _spin_kernel():
    if "k" not in _spin:
        import cupy
        _spin["k"] = cupy.RawKernel(_SPIN_SOURCE, "spin_ns")
    return _spin["k"]


def spin(ns):
    """Keep the current stream busy for about ``ns`` nanoseconds."""
    _spin_kernel()((1,), (1,), (np.uint64(int(ns)),))


def same_stream(torch):
    """A context manager that puts PyTorch's work on CuPy's current stream (a no-op when both already
    use the default stream)."""
    import contextlib

    import cupy
    ptr = cupy.cuda.get_current_stream().ptr
    if torch.cuda.current_stream().cuda_stream == ptr:
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(ptr))


def time_gpu(run, sets, reps=20, groups=15, warmup=5):
    """Median GPU milliseconds of one ``run(i)`` (``i`` picks one of ``sets`` input sets, in rotation so
    repeated calls do not see the same data).

    Returns a dict: ``ms`` (median over groups), ``min_ms``, ``max_ms``, ``groups``, ``reps``,
    ``host_us_per_call`` (how long the host took to enqueue one call: the launch overhead a training
    loop pays when it does not hide it) and ``groups_waiting_for_host`` (groups the GPU may have waited
    in even at the longest spin: their time includes host time; 0 in a clean measurement).
    """
    import cupy
    stream = cupy.cuda.get_current_stream()
    for i in range(warmup):
        run(i % sets)
    stream.synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    t0 = time.perf_counter()
    for r in range(reps):
        run(r % sets)
    host = time.perf_counter() - t0
    stream.synchronize()
    spin_ns = min(int(2 * host * 1e9) + 50_000, _MAX_SPIN_NS)
    times, host_times, k, waited = [], [], 0, 0
    while len(times) < groups:
        spin(spin_ns)
        start.record(stream)
        t0 = time.perf_counter()
        for _ in range(reps):
            run(k % sets)
            k += 1
        host = time.perf_counter() - t0
        end.record(stream)
        end.synchronize()
        host_times.append(host / reps)
        if host * 1e9 > spin_ns and spin_ns < _MAX_SPIN_NS:  # the GPU waited for the host: again, longer
            spin_ns = min(2 * spin_ns, _MAX_SPIN_NS)
            continue
        waited += host * 1e9 > spin_ns
        times.append(cupy.cuda.get_elapsed_time(start, end) / reps)
    return {"ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "groups": groups,
            "reps": reps, "host_us_per_call": round(1e6 * statistics.median(host_times), 2),
            "groups_waiting_for_host": waited}


def settings(quick):
    """(reps, groups, warmup) of ``time_gpu`` for a full or a quick run."""
    return (10, 5, 3) if quick else (20, 15, 5)
