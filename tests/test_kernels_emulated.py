"""The real CUDA kernels run on the CPU by an EMULATOR (tests/emulator/, see its README) against the float64
oracle: tests/test_gpu.py, tests/test_gpu_normalization_depthwise.py, tests/test_gpu_activations_losses.py,
tests/test_gpu_image.py and tests/test_fastpath.py (all but the tests listed in EXCLUDE) plus the checks below,
in a subprocess whose fake ``cupy`` never reaches this process. The fast path's CUDA graphs are recorded and
replayed by the fake ``cupy`` (operations recorded at capture, run in order at each replay), so its kernels and
its Python orchestration both run here.

EMULATION, not a GPU: it checks indexing, bounds (guard zones around every array), reduction order and
barrier placement (every thread of a block at the same ``__syncthreads``; threads of a block run in both
orders, so a missing barrier shows), and that work on two streams sharing a buffer is ordered (synchronised,
or through events). It does not model warps, the memory model, concurrent blocks, timing or real races
inside a kernel. Nothing that passes here is verified on a GPU.

Skipped (with the reason) where g++ is missing. Shared objects are cached outside the repository (see
tests/emulator/fake_cupy.py). This file holds both sides: the test of this process, and, when
GPUCNN_EMU_INNER=1, the extra tests of the emulated subprocess.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from conftest import skip_kernel_check

ROOT = pathlib.Path(__file__).resolve().parent.parent
EMULATOR = ROOT / "tests" / "emulator"
INNER = os.environ.get("GPUCNN_EMU_INNER") == "1"

# tests/test_gpu.py tests the emulated run leaves out, and why
EXCLUDE = {
    "test_batch_times_channels_beyond_the_grid_limits":
        "70,000 images take a minute here; test_grid_stride_loops_with_few_blocks checks the same loops",
    "test_backward_passes_are_bitwise_reproducible": "sequential emulation is deterministic anyway (5 s)",
    "test_seed_model_one_epoch_on_an_mnist_subset_matches_numpy":
        "tests/test_fastpath.py: 4,096 MNIST images take minutes here; the small models cover the same path",
}
MIN_PASSED = 1325  # the emulated run must have run (and passed) at least this many tests

# The kernels when this test was written: each must be launched by the emulated run. Kernels added later
# are reported (a warning) until a test launches them and they are added here.
KNOWN_KERNELS = frozenset("""
relu_forward relu_backward softmax_forward softmax_backward dropout_forward dropout_backward
conv2d_forward conv2d_backward_data conv2d_backward_filter conv2d_backward_filter_reduce
dense_forward dense_backward_data dense_backward_weights dense_backward_bias
crossentropy_forward_onehot crossentropy_forward_sparse softmax_crossentropy_backward_onehot
softmax_crossentropy_backward_sparse crossentropy_backward_onehot crossentropy_backward_sparse
count_correct_onehot count_correct_sparse sgd_update rmsprop_update adam_update weight_decay
maxpool2d_forward maxpool2d_backward avgpool2d_forward avgpool2d_backward
global_avgpool2d_forward global_avgpool2d_backward
conv2d_relu_maxpool_forward maxpool2d_relu_backward permutation_keys gather_batch step_advance
softmax_crossentropy_step_onehot softmax_crossentropy_step_sparse sigmoid_binary_crossentropy_step
add_forward copy_into_columns copy_from_columns
global_maxpool2d_forward global_maxpool2d_backward zero_padding2d_forward zero_padding2d_backward
batchnorm_partial_sums batchnorm_mean batchnorm_variance_update batchnorm_inverse_std batchnorm_normalize
batchnorm_backward_partial_sums batchnorm_backward_reduce batchnorm_backward_data batchnorm_fold
depthwise_conv2d_forward depthwise_conv2d_backward_data depthwise_conv2d_backward_filter
elementwise_activation_forward elementwise_activation_backward binary_crossentropy_forward
binary_crossentropy_backward sigmoid_binary_crossentropy_backward count_binary_correct rescale flip_images
affine_transform adjust_contrast step_row
""".split())
# Known kernels that no emulated test launches yet: reported, not failed. (Empty since the emulator records
# and replays CUDA graphs, which the fast path's kernels run in.)
PENDING = frozenset()


if not INNER:
    def test_kernels_on_the_cpu_emulator(tmp_path):
        if shutil.which("g++") is None:
            skip_kernel_check("g++ not found: the kernel emulator compiles the kernels for the host with it")
        if not sys.platform.startswith("linux"):
            skip_kernel_check("the kernel emulator's fibers (ucontext) are only set up for Linux")
        report_path = tmp_path / "emulated.json"
        env = dict(os.environ, GPUCNN_EMU_INNER="1", GPUCNN_EMU_REPORT=str(report_path),
                   GPUCNN_EMU_EXCLUDE=json.dumps(EXCLUDE),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(EMULATOR), str(ROOT), os.environ.get("PYTHONPATH")])))
        env.pop("GPUCNN_NO_POOL", None)  # a sanitizer setting for real CuPy (tests/conftest.py)
        env.pop("GPUCNN_FASTPATH", None)  # the fast path on by default; tests that compare paths set it
        command = [sys.executable, "-m", "pytest", "-p", "fake_cupy", "-p", "no:cacheprovider", "-q", "-o",
                   "addopts=-ra", "tests/test_gpu.py", "tests/test_gpu_normalization_depthwise.py",
                   "tests/test_gpu_activations_losses.py", "tests/test_gpu_image.py", "tests/test_fastpath.py",
                   "tests/test_kernels_emulated.py"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        output = (done.stdout + done.stderr)[-8000:]
        assert report_path.exists(), f"the emulated run wrote no report (exit {done.returncode}):\n{output}"
        report = json.loads(report_path.read_text())
        outcomes = report["outcomes"]
        assert done.returncode == 0 and not outcomes.get("failed"), \
            f"the emulated kernel tests failed ({seconds:.0f} s):\n{output}"
        assert not report["problems"], report["problems"]
        passed = len(outcomes.get("passed", []))
        assert passed >= MIN_PASSED, f"only {passed} emulated tests passed, expected at least {MIN_PASSED}"

        launched, table = set(report["launched"]), set(report["kernels"])
        missing = (KNOWN_KERNELS & table) - launched - PENDING
        assert not missing, f"kernels no emulated test launched: {sorted(missing)}"
        new = table - KNOWN_KERNELS - PENDING - launched
        pending = (PENDING & table) - launched
        if new or pending or report["build_errors"]:
            warnings.warn(f"kernels not run by the emulator: new {sorted(new)}, pending {sorted(pending)}; "
                          f"files that do not build for it: {report['build_errors']}")
        print(f"emulated: {passed} passed, {len(outcomes.get('skipped', []))} skipped, {len(launched)} of "
              f"{len(table)} kernels launched, {seconds:.1f} s")


# ===================================================================================== inside the emulator
if INNER:
    import fake_cupy
    import cupy  # the fake one: fake_cupy is loaded as a pytest plugin first
    import test_gpu as T

    from gpucnn import backend, layers, models
    from gpucnn.engines import cuda_loader as cuda
    from gpucnn.engines import cuda_ops as ops
    from gpucnn.utils import set_random_seed

    assert cupy is fake_cupy.cupy

    _BROKEN = r"""
    extern "C" __global__ void divergent_barrier(float* y, int n) {
        if (threadIdx.x < 16) __syncthreads();
        y[threadIdx.x] = 1.0f;
    }
    extern "C" __global__ void early_exit_before_barrier(float* y, int n) {
        if (threadIdx.x >= n) return;
        __syncthreads();
        y[threadIdx.x] = 1.0f;
    }
    extern "C" __global__ void missing_barrier(float* y, int n) {
        __shared__ float s[64];
        s[threadIdx.x] = threadIdx.x;
        y[threadIdx.x] = s[(threadIdx.x + 1) % n];  // no __syncthreads() between the write and the read
    }
    extern "C" __global__ void with_barrier(float* y, int n) {
        __shared__ float s[64];
        s[threadIdx.x] = threadIdx.x;
        __syncthreads();
        y[threadIdx.x] = s[(threadIdx.x + 1) % n];
    }
    extern "C" __global__ void writes_past_the_end(float* y, int n) {
        y[threadIdx.x + 1] = 1.0f;
    }
    """

    @pytest.fixture(scope="module")
    def broken():
        import ctypes

        lib = ctypes.CDLL(fake_cupy.build_source("broken.cu", _BROKEN))
        return {name: fake_cupy.EmulatedKernel(name, params, lib)
                for name, params in cuda.parse_kernels(_BROKEN).items()}

    def test_the_emulator_catches_broken_kernels(broken):
        """The checks work: each deliberate bug is flagged, and the correct kernel passes."""
        for name, what in (("divergent_barrier", "different barriers|exited"),
                           ("early_exit_before_barrier", "exited while the others wait"),
                           ("writes_past_the_end", "wrote outside")):
            with pytest.raises(fake_cupy.EmulatedKernelError, match=what):
                broken[name]((2, 1, 1), (64, 1, 1), (cupy.zeros(64, np.float32), 40))
        y = cupy.zeros(64, np.float32)
        del fake_cupy.PROBLEMS[:]  # expected ones
        want = (np.arange(64) + 1) % 64
        broken["with_barrier"]((2, 1, 1), (64, 1, 1), (y, 64))
        np.testing.assert_array_equal(cupy.asnumpy(y), want)
        broken["missing_barrier"]((2, 1, 1), (64, 1, 1), (y, 64))  # block 1 runs its threads last to first
        assert not np.array_equal(cupy.asnumpy(y), want)

    @pytest.fixture
    def few_blocks(monkeypatch):
        """Grids capped at 2 blocks along x and 3 images along y: every grid-stride loop goes round."""
        image_grid = ops._image_grid
        monkeypatch.setattr(ops, "_MAX_BLOCKS", 2)
        monkeypatch.setattr(ops, "_image_grid", lambda per, n: (min(image_grid(per, n)[0], 2), min(n, 3)))

    def test_grid_stride_loops_with_few_blocks(few_blocks):
        T.test_conv2d_matches_reference(n=7, c=3, hw=(7, 5), k=3, s=2, pad="same")
        T.test_conv2d_matches_reference(n=7, c=8, hw=(28, 28), k=5, s=1, pad="valid")
        T.test_maxpool2d_exact(hw=(11, 11), p=3, s=2, pad="same")
        T.test_avgpool2d_exact(hw=(7, 5), p=2, s=1, pad="valid")
        T.test_global_avgpool2d_matches_reference()
        for activation in ("relu", "softmax"):
            T.test_activations_match_reference(shape=(2, 5, 5, 8), activation=activation)
        T.test_dense_matches_reference(n=65, n_in=33, units=70, bias=True, activation="relu")
        for sparse in (True, False):
            T.test_crossentropy_matches_reference(n=300, k=3, sparse=sparse)
        T.test_dropout_mask(rate=0.5)
        T.test_sgd_update_matches_reference(momentum=0.9, nesterov=True)
        T.test_rmsprop_update_matches_reference(lr=0.001, rho=0.8, eps=1e-6, momentum=0.5, centered=True)
        T.test_adam_update_matches_reference(lr=0.01, b1=0.8, b2=0.99, eps=1e-3)
        T.test_weight_decay_matches_reference(lr=0.1, wd=0.5)
        T.test_maxpool2d_relu_backward_matches_reference(hw=(11, 11), pool=(2, 2), stride=(2, 2), pad="valid",
                                                         activation="relu")
        T.test_conv2d_relu_maxpool_forward_matches_reference(T.CONV_POOL_GRID[4])
        T.test_dropout_reads_the_seed_of_its_step_and_slot(rate=0.5)
        T.test_permutation_keys_give_a_seeded_permutation()

    def test_activation_loss_and_image_kernels_with_few_blocks(few_blocks):
        """kernels/activations.cu's elementwise kernels, loss.cu's binary and from-logits kernels and image.cu
        with grids capped: 300 rows and 2,100 elements over 2 blocks, 5 images over 3 grid rows."""
        import test_gpu_activations_losses as A
        import test_gpu_image as I

        losses, images = A.TestCudaEngine(), I.TestCudaEngine()
        for activation in ("gelu", ("elu", 0.5), "silu"):
            losses.test_activations_match_reference(activation=activation, shape=(3, 700))
        for from_logits in (False, True):
            losses.test_binary_crossentropy_matches_reference(n=300, units=2, from_logits=from_logits, smoothing=0.2)
        losses.test_crossentropy_from_logits_matches_reference(n=300, k=3, sparse=True)
        losses.test_count_binary_correct_matches_reference()
        for interpolation in ("bilinear", "nearest"):
            images.test_affine_transform_matches_reference((5, 7, 9, 3), interpolation, "wrap")
        images.test_flip_matches_reference((5, 6, 4, 2))
        images.test_rescale_and_contrast_match_reference((5, 6, 4, 3))
        for dtype, width in ((np.uint8, 1), (np.float32, 8)):
            images.test_step_row_matches_reference(dtype, width)

    def test_the_fast_path_with_few_blocks(few_blocks, monkeypatch):
        """The fast path's own grids (gather_batch, maxpool2d_relu_backward, the scheduled kernels) capped."""
        test_a_short_fit_matches_the_numpy_engine("sparse_categorical_crossentropy", "adam", True, monkeypatch)

    def _fast_fit(fast, build, x, y, batch_size, monkeypatch, callbacks=()):
        """(history, weights, per-batch logs) of a 2-epoch fit of ``build()`` on the CUDA engine."""
        from gpucnn.models import fastpath
        from gpucnn.callbacks import Callback

        monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
        seen = []

        class Record(Callback):
            batch_hooks_use_model = False  # (reads logs only: the steps run ahead, the logs as the reads give them)

            def on_train_batch_end(self, batch, logs=None):
                seen.append(dict(logs or {}))

        backend.set_engine("gpu")
        set_random_seed(6)
        model = build()
        if fast:
            assert fastpath.unsupported_reason(model) is None
        history = model.fit(x, y, batch_size=batch_size, epochs=2, verbose=0, shuffle=False,
                            callbacks=[Record()]).history
        weights = [np.array(w) for w in model.get_weights()]
        backend.set_engine("cpu")
        return history, weights, seen

    def test_the_fast_path_reads_metrics_as_it_goes(monkeypatch):
        """Every READ_EVERY steps an asynchronous copy of the step slots, read once its event is done: the
        running logs it shows are the plain path's of the step the copy covered."""
        from gpucnn.models import fastpath

        monkeypatch.setattr(fastpath, "READ_EVERY", 2)
        monkeypatch.setattr(models.Sequential, "READ_EVERY", 1)  # the plain path: running logs at every step
        rng = np.random.default_rng(8)
        x = rng.random((100, 9, 9, 2)).astype(np.float32)  # 13 steps of 8, the last of 4
        y = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 100)]
        build = lambda: _model("adam", "categorical_crossentropy")  # noqa: E731
        (h_fast, w_fast, fast), (h_plain, w_plain, plain) = (
            _fast_fit(f, build, x, y, 8, monkeypatch) for f in (True, False))
        assert len(fast) == len(plain) == 26
        for s, logs in enumerate(fast):
            step = s % 13
            if step < 2:
                assert not logs, (s, logs)  # nothing read yet in this epoch
                continue
            covered = s if step == 12 else s - 1 - (step % 2)  # the last step reads everything
            for key in ("loss", "accuracy"):
                np.testing.assert_allclose(logs[key], plain[covered][key], rtol=1e-5, err_msg=f"{key} {s}")
        np.testing.assert_allclose(h_fast["loss"], h_plain["loss"], rtol=1e-5)
        for a, b in zip(w_fast, w_plain):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)

    def test_the_fast_path_stages_without_bias_and_unfused_pools(monkeypatch):
        """Stages small_model does not have: a Conv2D and a Dense without bias (their own db buffers), a max
        pool that is not fused (3x3), average and global pooling, a relu Activation, a linear Conv2D with
        its 2x2 max-pool fused, an output Activation('softmax'); SGD with Nesterov momentum."""
        from gpucnn import optimizers

        def build():
            model = models.Sequential([
                layers.Conv2D(5, (3, 3), strides=(2, 2), padding="same", use_bias=False, activation="relu",
                              input_shape=(13, 11, 2)),
                layers.MaxPooling2D((3, 3), strides=(1, 1)),
                layers.AveragePooling2D((2, 2), strides=(1, 1), padding="same"),
                layers.Activation("relu"),
                layers.Conv2D(6, (2, 2)),
                layers.MaxPooling2D((2, 2)),
                layers.GlobalAveragePooling2D(),
                layers.Dense(7, use_bias=False, activation="relu"),
                layers.Dense(3),
                layers.Activation("softmax"),
            ])
            model.compile(optimizer=optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            return model

        rng = np.random.default_rng(9)
        x = rng.normal(size=(19, 13, 11, 2)).astype(np.float32)
        y = rng.integers(0, 3, 19)
        (h_fast, w_fast, _), (h_plain, w_plain, _) = (_fast_fit(f, build, x, y, 6, monkeypatch)
                                                      for f in (True, False))
        np.testing.assert_allclose(h_fast["loss"], h_plain["loss"], rtol=1e-5)
        assert h_fast["accuracy"] == h_plain["accuracy"]
        for a, b in zip(w_fast, w_plain):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)

    def test_the_fast_path_captures_random_augmentation(monkeypatch):
        """RandomFlip, RandomRotation, RandomZoom, RandomTranslation and RandomContrast (own seeds) in front
        of a convnet with Dropout: inside the captured step their values come from the epoch's tables by the
        device step counter (a smaller last batch included). Fast path and plain CUDA path draw the same
        values in the same order, so their fits agree; without augmentation the weights differ."""
        from gpucnn import optimizers

        def build(augment=True):
            front = [layers.RandomFlip(seed=1), layers.RandomRotation(0.1, seed=2),
                     layers.RandomZoom(0.2, seed=3), layers.RandomTranslation(0.1, 0.2, seed=4),
                     layers.RandomContrast(0.3, seed=5)] if augment else []
            model = models.Sequential([
                layers.Input(shape=(9, 8, 2)), *front,
                layers.Conv2D(4, (3, 3), activation="relu"),
                layers.MaxPooling2D((2, 2)),
                layers.Flatten(),
                layers.Dropout(0.25, seed=6),
                layers.Dense(3, activation="softmax"),
            ])
            model.compile(optimizer=optimizers.SGD(0.1), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            return model

        rng = np.random.default_rng(11)
        x = rng.uniform(0, 255, size=(17, 9, 8, 2)).astype(np.float32)  # 3 steps of 6, the last of 5
        y = rng.integers(0, 3, 17)
        (h_fast, w_fast, _), (h_plain, w_plain, _) = (_fast_fit(f, build, x, y, 6, monkeypatch)
                                                      for f in (True, False))
        np.testing.assert_allclose(h_fast["loss"], h_plain["loss"], rtol=1e-5)
        for a, b in zip(w_fast, w_plain):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
        _, w_still, _ = _fast_fit(True, lambda: build(augment=False), x, y, 6, monkeypatch)
        assert max(np.abs(a - b).max() for a, b in zip(w_fast, w_still)) > 1e-3

    def test_emulated_graphs_record_and_replay():
        """The harness's capture: operations are recorded, not run, and replayed in order at each launch,
        reading the arrays as they are then; what CUDA refuses inside a capture is refused."""
        x, y = cupy.zeros(4, np.float32), cupy.zeros(4, np.float32)
        two = cupy.full(4, 2.0, np.float32)
        stream = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.Device().synchronize()  # (the arrays are filled on the null stream)
        with stream:
            x[...] = 1.0
            stream.begin_capture()
            cuda.launch("relu_forward", 1, 256, (x, y, 4))
            x[...] = x  # (a device-to-device copy: recorded too)
            cupy.copyto(x, two)
            y.fill(5.0)
            graph = stream.end_capture()
        assert graph.operations() == ["kernel relu_forward", "a copy into a device array", "cupy.copyto",
                                      "a memset of a device array"]
        stream.synchronize()  # (the host reads on the null stream what the stream wrote)
        np.testing.assert_array_equal(cupy.asnumpy(x), 1.0)  # nothing ran
        np.testing.assert_array_equal(cupy.asnumpy(y), 0.0)
        graph.launch(stream)
        stream.synchronize()
        np.testing.assert_array_equal(cupy.asnumpy(y), 5.0)
        np.testing.assert_array_equal(cupy.asnumpy(x), 2.0)
        two[...] = 3.0
        cupy.cuda.Device().synchronize()  # (written on the null stream: done before the stream reads it)
        graph.launch(stream)  # the values as they are at the replay
        stream.synchronize()
        np.testing.assert_array_equal(cupy.asnumpy(x), 3.0)

        def refuse_allocation(size):
            raise MemoryError(f"allocation of {size}")

        pinned = np.zeros(4, np.float32)
        refused = {  # what -> (error, whether CUDA invalidates the capture)
            "synchronize": (lambda: stream.synchronize(), True),
            "get": (lambda: x.get(), False),
            "async get": (lambda: x.get(stream=stream, out=pinned, blocking=False), False),
            "set": (lambda: x.set(pinned), False),
            "arithmetic": (lambda: x + 1, False),
            "copy": (lambda: x.copy(), False),
            "int": (lambda: int(x[:1].reshape(())), False),  # (x[0] is a NumPy scalar here, read at once)
            "other stream": (lambda: cuda.launch("relu_forward", 1, 256, (x, y, 4)), False),
            "allocation": (lambda: cupy.empty(3, np.float32), False),
        }
        for what, (run, invalidates) in refused.items():
            with stream:
                stream.begin_capture()
                previous = cupy.cuda.get_allocator()
                cupy.cuda.set_allocator(refuse_allocation)
                try:
                    if what == "other stream":
                        with cupy.cuda.Stream():
                            with pytest.raises(fake_cupy.EmulatedCaptureError):
                                run()
                    else:
                        with pytest.raises((fake_cupy.EmulatedCaptureError, MemoryError)):
                            run()
                finally:
                    cupy.cuda.set_allocator(previous)
                    if invalidates:
                        with pytest.raises(RuntimeError, match="invalidated"):
                            stream.is_capturing()
                        with pytest.raises(fake_cupy.CUDARuntimeError, match="Invalidated"):
                            stream.end_capture()
                    else:
                        assert len(stream.end_capture()) == 0, what
                assert not stream.is_capturing(), what
        assert (x + 1).sum() == 16  # the hooks are gone after the capture

    # ---- the emulated cupy is as strict as CuPy 14.2 (tests/emulator/README.md): one test per rule
    def test_strict_host_copies_are_refused_while_the_stream_captures():
        x, pinned = cupy.zeros(4, np.float32), np.zeros(4, np.float32)
        stream = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.Device().synchronize()
        copies = {"H2D": [lambda: x.set(pinned), lambda: x.set(pinned, stream=stream)],
                  "D2H": [lambda: x.get(), lambda: x.get(stream=stream, out=pinned, blocking=False),
                          lambda: cupy.asnumpy(x, stream=stream, out=pinned, blocking=False)]}
        with stream:
            for direction, runs in copies.items():
                for run in runs:
                    stream.begin_capture()
                    try:
                        with pytest.raises(RuntimeError, match=f"capturing, so {direction} transfers are disallowed"):
                            run()
                        assert stream.is_capturing()  # (a check of CuPy's: the capture is still valid)
                    finally:
                        assert len(stream.end_capture()) == 0
            x.set(pinned + 1)  # outside a capture: allowed
            x.get(stream=stream, out=pinned, blocking=False)
        np.testing.assert_array_equal(pinned, 1.0)

    def test_strict_get_and_set_take_exactly_the_shape_and_dtype():
        x = cupy.zeros((2, 3), np.float32)
        for bad, error in ((np.zeros(6, np.float32), ValueError), (np.zeros((3, 2), np.float32), ValueError),
                           (np.zeros((2, 3), np.float64), TypeError), (cupy.zeros((2, 3), np.float32), TypeError),
                           ([[0.0] * 3] * 2, TypeError)):
            with pytest.raises(error):
                x.set(bad)
            if isinstance(bad, np.ndarray):
                with pytest.raises(error):
                    x.get(out=bad)
        with pytest.raises(RuntimeError, match="non-contiguous"):
            x[:, ::2].set(np.zeros((2, 2), np.float32))
        x.set(np.ones((2, 3), np.float32))
        out = np.zeros((2, 3), np.float32)
        assert x.get(out=out) is out and (out == 1).all()

    def test_strict_creation_defaults_to_float64_as_cupy():
        for make in (cupy.zeros, cupy.ones, cupy.empty):
            assert make(3).dtype == np.float64
            assert make(3, np.float32).dtype == np.float32
        assert cupy.full(3, 1).dtype == np.array(1).dtype and cupy.full(3, 0.5).dtype == np.float64
        assert cupy.full(3, np.float32(0.5)).dtype == np.float32

    def test_strict_numpy_conversions_of_device_arrays_raise():
        x = cupy.arange(6, dtype=np.float32).reshape(2, 3)
        for convert in (np.asarray, np.array, np.asanyarray, np.ascontiguousarray, np.asfortranarray,
                        lambda a: np.testing.assert_array_equal(a, a)):
            with pytest.raises(TypeError, match="Implicit conversion"):
                convert(x)
        assert np.asarray(x.get()).shape == (2, 3)  # an explicit copy
        # NumPy functions CuPy implements still take device arrays, and give device arrays
        assert float(np.sum(x)) == 15 and isinstance(np.pad(x, 1), cupy.ndarray)
        assert isinstance(np.concatenate([x, x]), cupy.ndarray)

    def test_strict_host_arrays_are_not_copied_to_the_device_implicitly():
        x = cupy.zeros(3, np.float32)
        host = np.ones(3, np.float32)
        with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
            x[...] = host
        with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
            cupy.copyto(x, host)
        with pytest.raises(ValueError, match="non-scalar numpy.ndarray"):
            x.fill(host)
        for operation in (lambda: x + host, lambda: np.multiply(host, x), lambda: np.add(x, x, out=(host,))):
            with pytest.raises(TypeError, match="Unsupported type"):
                operation()
        x[...] = np.float32(2)  # scalars and 0-d arrays are fine, as is an advanced index
        cupy.copyto(x, np.array([3.0], np.float32))
        x[np.array([0, 2])] = np.array([5.0, 6.0], np.float32)
        np.testing.assert_array_equal(x.get(), [5, 3, 6])
        assert bool((x > np.array(4.0)).any())  # (a 0-d host array in a comparison: CuPy takes its value)

    def test_strict_a_graph_replayed_over_a_freed_buffer_fails():
        """A CUDA graph keeps raw pointers, not the arrays: the emulated Graph keeps nothing alive either,
        and replaying it after one of its buffers was freed fails instead of reading freed memory."""
        import gc
        import weakref

        x = cupy.ones(4, np.float32)
        y = cupy.zeros(8, np.float32)[2:6]  # a view: the graph keeps the buffer's address, not the view
        stream = cupy.cuda.Stream(non_blocking=True)
        cupy.cuda.Device().synchronize()
        with stream:
            stream.begin_capture()
            cuda.launch("relu_forward", 1, 256, (x, y, 4))
            graph = stream.end_capture()
        root = weakref.ref(y.base.base if y.base.base is not None else y.base)
        graph.launch(stream)
        np.testing.assert_array_equal(y.get(stream=stream), 1.0)
        kept = y.base  # the buffer stays alive through another array: replaying is fine
        del y
        gc.collect()
        graph.launch(stream)
        del kept
        gc.collect()
        assert root() is None  # the graph did not keep the buffer alive
        with pytest.raises(fake_cupy.EmulatedCaptureError, match="freed after the capture"):
            graph.launch(stream)

    def test_strict_an_invalidated_capture_must_still_be_ended():
        x, y = cupy.zeros(4, np.float32), cupy.zeros(4, np.float32)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            with pytest.raises(fake_cupy.EmulatedCaptureError, match="StreamCaptureUnsupported"):
                cupy.cuda.Device().synchronize()
            with pytest.raises(RuntimeError, match="invalidated the capture"):
                stream.is_capturing()
            with pytest.raises(cuda.KernelLaunchError, match="Invalidated"):
                cuda.launch("relu_forward", 1, 256, (x, y, 4))
            with pytest.raises(fake_cupy.CUDARuntimeError, match="Invalidated"):
                stream.end_capture()
            assert not stream.is_capturing()
            stream.begin_capture()  # the stream captures again
            cuda.launch("relu_forward", 1, 256, (x, y, 4))
            assert len(stream.end_capture()) == 1

    def test_stream_order_two_streams_unordered_on_one_buffer_are_reported():
        """Work on two streams that touches one buffer (one of them writing) must be ordered, by a synchronisation
        the host waited for or an event the other stream waits for; the legacy null stream and blocking streams
        are ordered implicitly, a non-blocking stream with nothing. Each case as a GPU would see it."""
        race = fake_cupy.EmulatedStreamRaceError
        side = cupy.cuda.Stream(non_blocking=True)
        x, y = cupy.zeros(4, np.float32), cupy.zeros(4, np.float32)  # memsets on the null stream
        with side, pytest.raises(race, match="relu_forward on a non-blocking stream .* reads .* a memset"):
            cuda.launch("relu_forward", 1, 256, (x, y, 4))  # reads x before its memset is known to be done
        cupy.cuda.Device().synchronize()
        with side:
            cuda.launch("relu_forward", 1, 256, (x, y, 4))  # ordered now; writes y on the side stream
        with pytest.raises(race, match="on the null .* reads .* relu_forward on a non-blocking stream"):
            y.get()  # the null stream does not wait for a non-blocking stream
        with pytest.raises(race, match="reads"):
            float(y[:1].reshape(()))
        with pytest.raises(race, match="writes .* that kernel relu_forward .* read"):
            x.fill(1.0)  # a write after the side stream's read of x, unordered
        event = side.record()
        cupy.cuda.Stream.null.wait_event(event)
        x.fill(1.0)
        np.testing.assert_array_equal(y.get(stream=side), 0.0)  # on the writer's own stream: in order
        side.wait_event(cupy.cuda.Stream.null.record())  # the fill first
        with side:
            cuda.launch("relu_forward", 1, 256, (x, y, 4))
        side.synchronize()
        np.testing.assert_array_equal(y.get(), 1.0)
        blocking = cupy.cuda.Stream()  # a blocking stream and the null stream wait for each other
        z = cupy.zeros(4, np.float32)
        with blocking:
            cuda.launch("relu_forward", 1, 256, (z, y, 4))
        np.testing.assert_array_equal(y.get(), 0.0)
        with side:  # a graph's nodes are checked as it replays
            side.begin_capture()
            cuda.launch("relu_forward", 1, 256, (x, y, 4))
            graph = side.end_capture()
        x.fill(2.0)
        with pytest.raises(race, match=r"\(in a graph\)"):
            graph.launch(side)
        cupy.cuda.Device().synchronize()
        graph.launch(side)
        assert y.get(stream=side).tolist() == [2.0] * 4
        with side:
            cuda.launch("relu_forward", 1, 256, (x, y, 4))  # writes y on the side stream
        with pytest.raises(race, match="ndarray.copy on the null"):
            y.copy()  # a device-to-device copy reads y on the null stream
        with pytest.raises(race, match="numpy.sum .* writes"):
            np.sum(x, out=y[:1].reshape(()))  # NumPy's out= is written on the null stream
        assert np.shape(y) == (4,)  # (reads no memory)
        import threading
        raised = []

        def read_on_another_thread():  # whose current stream is its own: the null stream, not this thread's
            try:
                y.get()
            except race:
                raised.append(True)
        with side:
            thread = threading.Thread(target=read_on_another_thread)
            thread.start()
            thread.join()
        assert raised == [True]
        assert [what for what, problem in fake_cupy.PROBLEMS if problem == "stream order"] == [
            "kernel relu_forward", "ndarray.get()", "ndarray.__float__", "a memset of a device array",
            "kernel relu_forward (in a graph)", "ndarray.copy", "numpy.sum", "ndarray.get()"]
        del fake_cupy.PROBLEMS[:]  # expected ones

    def test_an_empty_batch_reads_nothing():
        x, w, b = cupy.zeros((0, 5, 5, 3), np.float32), cupy.ones((3, 3, 3, 4), np.float32), cupy.ones(4, np.float32)
        pad = (1, 1, 1, 1)
        y = ops.conv2d_forward(x, w, b, (1, 1), pad, "relu")
        assert y.shape == (0, 5, 5, 4)
        assert ops.conv2d_backward_data(y, w, x.shape, (1, 1), pad).shape == x.shape
        dw, db = ops.conv2d_backward_filter(y, x, w.shape, (1, 1), pad)
        np.testing.assert_array_equal(cupy.asnumpy(dw), 0)
        np.testing.assert_array_equal(cupy.asnumpy(db), 0)
        yp, idx = ops.maxpool2d_forward(x, (2, 2), (2, 2), (0, 0, 0, 0))
        assert ops.maxpool2d_backward(yp, idx, x.shape, (2, 2), (2, 2), (0, 0, 0, 0)).shape == x.shape
        assert ops.global_avgpool2d_forward(x).shape == (0, 3)
        xd = cupy.zeros((0, 6), np.float32)
        p = ops.dense_forward(xd, cupy.ones((6, 3), np.float32), None, "softmax")
        dwd, dbd = ops.dense_backward_weights(cupy.zeros((0, 3), np.float32), xd)
        np.testing.assert_array_equal(cupy.asnumpy(dwd), 0)
        np.testing.assert_array_equal(cupy.asnumpy(dbd), 0)
        for sparse, labels in ((True, cupy.zeros(0, np.int32)), (False, cupy.zeros((0, 3), np.float32))):
            assert ops.crossentropy_forward(p, labels, sparse).shape == (0,)
            assert int(ops.count_correct(p, labels, sparse)) == 0

    def _history(engine, x, y, loss, optimizer):
        backend.set_engine(engine)
        set_random_seed(3)
        model = _model(optimizer, loss)
        history = model.fit(x, y, batch_size=10, epochs=2, verbose=0, shuffle=False).history
        weights = [np.array(w) for w in model.get_weights()]
        backend.set_engine("cpu")
        return history, weights

    def _model(optimizer, loss):
        model = models.Sequential([
            layers.Conv2D(6, (3, 3), activation="relu", input_shape=(9, 9, 2)),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(5, (2, 2), activation="relu", padding="same", strides=(2, 2)),
            layers.Flatten(),
            layers.Dense(7, activation="relu"),
            layers.Dense(4, activation="softmax"),
        ])
        model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
        return model

    @pytest.mark.parametrize("fast", [False, True], ids=["plain", "fastpath"])
    @pytest.mark.parametrize("loss, optimizer", [("sparse_categorical_crossentropy", "adam"),
                                                 ("categorical_crossentropy", "sgd"),
                                                 ("categorical_crossentropy", "rmsprop")])
    def test_a_short_fit_matches_the_numpy_engine(loss, optimizer, fast, monkeypatch):
        """The plain CUDA path, and the fast path (its step captured as a graph and replayed by the
        emulator; the first Conv2D and its 2x2 max-pool fused, a 7x7 convolution output pooled to 3x3)."""
        from gpucnn.models import fastpath

        monkeypatch.setenv("GPUCNN_FASTPATH", "1" if fast else "0")
        if fast:
            def refuse(model, reason):
                raise AssertionError(f"the fast path was not taken: {reason}")
            monkeypatch.setattr(fastpath, "notice", refuse)
        rng = np.random.default_rng(4)
        x = rng.random((25, 9, 9, 2)).astype(np.float32)  # a last batch of 5
        if fast and loss.startswith("sparse"):
            x = np.floor(x * 255).astype(np.float32) / 255  # stored as uint8 on the device
        labels = rng.integers(0, 4, 25)
        y = labels if loss.startswith("sparse") else np.eye(4, dtype=np.float32)[labels]
        (h_np, w_np), (h_cu, w_cu) = (_history(e, x, y, loss, optimizer) for e in ("cpu", "gpu"))
        assert h_np.keys() == h_cu.keys()
        for key in h_np:
            np.testing.assert_allclose(h_cu[key], h_np[key], rtol=1e-4, err_msg=key)
        for a, b in zip(w_cu, w_np):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(b).max()))
