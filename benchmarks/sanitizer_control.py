"""The positive control of gpu_check.py's sanitizer stage: one deliberate write past the end of an array,
which compute-sanitizer's memcheck must report (in kernel ``CONTROL_KERNEL``). When it does not, the tool
checks nothing on that machine and a clean report of gpucnn's tests would prove nothing.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitizer_control.py

CuPy's memory pool is off, so the array is an allocation of its own and the write lands outside every
allocation. Without the sanitizer the write goes unnoticed, or fails the launch; either way this program
only reports what it did. Not a test (pytest does not collect it)."""
CONTROL_KERNEL = "sanitizer_positive_control"
SOURCE = r"""
extern "C" __global__ void sanitizer_positive_control(float* y, int n) {
    y[n + threadIdx.x] = 1.0f;  // past the end of y (n elements): out of bounds on purpose
}
"""


def main():
    import cupy

    cupy.cuda.set_allocator(None)  # every array its own cudaMalloc: the sanitizer knows its exact bounds
    y = cupy.zeros(256, cupy.float32)
    kernel = cupy.RawKernel(SOURCE, CONTROL_KERNEL)
    kernel((1,), (32,), (y, cupy.int32(y.size)))
    print("control kernel launched", flush=True)
    try:
        cupy.cuda.Device().synchronize()
        print("control kernel finished")
    except Exception as exc:  # the sanitizer (or the GPU) stopped the bad write
        print(f"control kernel failed, as it may: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
