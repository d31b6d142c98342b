"""gpucnn.data.adapters: arrays, datasets, generators and PyDatasets as epochs of NumPy batches."""

import threading
import warnings

import numpy as np
import pytest

from gpucnn import utils
from gpucnn.data import PyDataset, adapt
from gpucnn.data.adapters import OUT_OF_DATA_WARNING

N, B = 10, 4  # samples, batch size


def _arrays():
    x = np.arange(N * 3, dtype=np.uint8).reshape(N, 3)
    return x, np.arange(N) % 3


def _epoch(adapter, epoch=0):
    return [(xb, yb) for xb, yb in adapter.batches(epoch)]


def _firsts(batches):
    """The first feature of each sample (for x from _arrays: 3 * index), batch by batch."""
    return [(xb[:, 0] / 3).astype(int).tolist() for xb, _ in batches]


def _gen(count, size=2, fail_at=None):
    for i in range(count):
        if i == fail_at:
            raise KeyError("bad batch")
        yield np.full((size, 3), i, np.float64), np.full(size, i % 2)


class Seq(PyDataset):
    def __init__(self, count=3, fail_at=None, **kwargs):
        super().__init__(**kwargs)
        self.count, self.fail_at, self.events, self.threads = count, fail_at, [], set()

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        self.threads.add(threading.current_thread().name)
        if i == self.fail_at:
            raise IndexError("no such batch")
        return np.full((2, 3), i, np.float32), np.array([i, i])

    def on_epoch_begin(self):
        self.events.append("begin")

    def on_epoch_end(self):
        self.events.append("end")


class Reiterable:
    """A dataset-like object: a fresh pass per iter(), with a length."""

    def __init__(self, count=3, bare=False):
        self.count, self.bare, self.passes = count, bare, 0

    def __len__(self):
        return self.count

    def __iter__(self):
        self.passes += 1
        for i in range(self.count):
            x = np.full((2, 3), i, np.int64)
            yield x if self.bare else (x, np.array([0, 1]))


# ------------------------------------------------------------------------------------------ arrays
def test_arrays_in_order_cast_to_float32():
    x, y = _arrays()
    a = adapt(x, y, batch_size=B)
    assert (a.num_batches, a.batch_size, a.kind) == (3, B, "arrays")
    assert a.arrays[0] is x and a.arrays[1] is y
    batches = _epoch(a)
    assert _firsts(batches) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(xb.dtype == np.float32 for xb, _ in batches)
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in batches]), y)
    xb, yb = a.peek()
    np.testing.assert_array_equal(xb, x[:B].astype(np.float32))


def test_arrays_shuffle_each_epoch_and_repeat_with_the_seed():
    x, y = _arrays()
    utils.set_random_seed(3)
    a = adapt(x, y, batch_size=B, shuffle=True)
    first, second = (sum(_firsts(_epoch(a, e)), []) for e in range(2))
    assert sorted(first) == sorted(second) == list(range(N)) and first != second
    for xb, yb in _epoch(a):
        np.testing.assert_array_equal(yb, (xb[:, 0] / 3).astype(int) % 3)  # pairs stay together
    utils.set_random_seed(3)
    b = adapt(x, y, batch_size=B, shuffle=True)
    assert sum(_firsts(_epoch(b)), []) == first


def test_shuffle_batch_keeps_each_batch_and_shuffles_inside_it_as_keras():
    """Keras's shuffle="batch": the same batches every epoch, each one's samples in a new order."""
    x, y = _arrays()
    utils.set_random_seed(3)
    a = adapt(x, y, batch_size=B, shuffle="batch")
    epochs = [_firsts(_epoch(a, e)) for e in range(3)]
    plain = _firsts(_epoch(adapt(x, y, batch_size=B)))
    for batches in epochs:
        assert [sorted(b) for b in batches] == plain
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # the order inside the batches changes
    from gpucnn.data.adapters import check_shuffle
    assert check_shuffle(1) is True and check_shuffle(0) is False and check_shuffle("batch") == "batch"
    with pytest.raises(ValueError, match="shuffle must be True, False or 'batch'.* got 'True'"):
        check_shuffle("True")


def test_arrays_predict_without_targets_and_default_batch_sizes():
    x, _ = _arrays()
    assert [yb for _, yb in _epoch(adapt(x, batch_size=B))] == [None] * 3
    assert adapt(x).batch_size == 32
    a = adapt(x, steps=3)  # Keras: batch size ceil(n / steps)
    assert a.batch_size == 4 and a.num_batches == 3


def test_arrays_with_steps_continue_across_epochs_and_warn_when_short():
    x, y = _arrays()
    a = adapt(x, y, batch_size=B, steps=2)  # 3 batches in a pass
    assert a.num_batches == 2
    assert _firsts(_epoch(a)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.warns(UserWarning, match="Your input ran out of data"):
        assert _firsts(_epoch(a)) == [[8, 9]]
    assert not a.exhausted
    assert _firsts(_epoch(a)) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a new pass


@pytest.mark.parametrize("x, y, error, message", [
    (np.zeros((4, 3)), np.zeros(5), ValueError, "4 samples but its targets have 5"),
    (np.zeros((0, 3)), None, ValueError, "is empty"),
    (np.array([["a", "b"]]), None, TypeError, "must be numeric"),
    (np.float32(3.0), None, ValueError, "scalar"),
])
def test_array_errors(x, y, error, message):
    with pytest.raises(error, match=message):
        adapt(x, y)


def test_bad_steps_and_unknown_inputs():
    with pytest.raises(ValueError, match="positive integer"):
        adapt(np.zeros((2, 2)), steps=0)
    with pytest.raises(TypeError, match="is a dict"):
        adapt({"image": np.zeros((2, 2))})
    with pytest.raises(TypeError, match="got int"):
        adapt(5)


# ------------------------------------------------------------------------------------------ datasets
def test_dataset_one_pass_per_epoch():
    ds = Reiterable()
    a = adapt(ds, batch_size=32, shuffle=True)  # batch size and shuffle belong to the dataset
    assert (a.num_batches, a.kind, a.arrays, a.batch_size) == (3, "dataset", None, None)
    for epoch in range(2):
        batches = _epoch(a, epoch)
        assert [int(xb[0, 0]) for xb, _ in batches] == [0, 1, 2]
        assert all(xb.dtype == np.float32 for xb, _ in batches)
    assert ds.passes == 2


def test_dataset_rejects_y_as_keras_does():
    with pytest.raises(ValueError, match="When providing `x` as a dataset, `y` should not be passed"):
        adapt(Reiterable(), np.zeros(3))


def test_dataset_of_bare_inputs_and_steps():
    a = adapt(Reiterable(count=3, bare=True), steps=2)
    assert a.num_batches == 2
    assert [int(xb[0, 0]) for xb, yb in _epoch(a) if yb is None] == [0, 1]
    with pytest.warns(UserWarning, match="ran out of data"):
        assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [2]
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [0, 1]


def test_a_dataset_pass_that_raises_is_followed_by_a_new_pass():
    class Flaky(Reiterable):
        def __iter__(self):
            self.passes += 1
            yield np.zeros((2, 3)), np.zeros(2)
            if self.passes == 1:
                raise OSError("network drive gone")
            yield np.ones((2, 3)), np.zeros(2)

    a = adapt(Flaky())
    with pytest.raises(OSError, match="network drive gone"):
        _epoch(a)
    assert len(_epoch(a)) == 2


# ------------------------------------------------------------------------------------------ generators
def test_generator_without_steps_is_one_epoch_then_exhausted():
    a = adapt(_gen(3))
    assert (a.num_batches, a.kind) == (None, "generator")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a generator that ends defines the epoch: no warning
        assert len(_epoch(a)) == 3
    assert a.exhausted
    with pytest.warns(UserWarning) as caught:
        assert _epoch(a, 1) == []
        a.warn_exhausted()
    assert [str(c.message) for c in caught] == [OUT_OF_DATA_WARNING]  # once


def test_generator_with_steps_continues_then_runs_out():
    a = adapt(_gen(5), steps=2)
    assert a.num_batches == 2
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [0, 1]
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [2, 3]
    with pytest.warns(UserWarning, match="Your input ran out of data; interrupting training"):
        assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [4]
    assert a.exhausted


def test_generator_peek_keeps_the_first_batch():
    a = adapt(_gen(3))
    xb, yb = a.peek()
    assert xb.shape == (2, 3) and xb.dtype == np.float32 and int(xb[0, 0]) == 0
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [0, 1, 2]


def test_generator_raising_mid_epoch_reaches_the_caller_unchanged():
    a = adapt(_gen(5, fail_at=2))
    seen = []
    with pytest.raises(KeyError) as info:
        for xb, _ in a.batches(0):
            seen.append(int(xb[0, 0]))
    assert seen == [0, 1] and info.value.args == ("bad batch",)
    assert not a.exhausted
    with pytest.warns(UserWarning, match="ran out of data"):
        assert _epoch(a, 1) == []  # a generator that raised is finished
    assert a.exhausted


def _items(*items):
    return iter(list(items))


@pytest.mark.parametrize("source, error, message", [
    (_items(), ValueError, "gave no batches"),
    (_items(np.zeros((2, 3))), ValueError, "must yield tuples"),
    (_items((np.zeros((2, 3)), np.zeros(2), np.ones(2))), ValueError, "sample weights are not supported"),
    (_items((np.zeros((2, 3)), np.zeros(3))), ValueError, "2 inputs but 3 targets"),
    (_items((np.array(["a", "b"]), np.zeros(2))), TypeError, "must be numeric"),
    (_items((np.zeros((2, 3)), np.zeros(2)), (1, 2, 3, 4)), ValueError, "has 4 elements"),
])
def test_bad_batches(source, error, message):
    with pytest.raises(error, match=message):
        _epoch(adapt(source))


def test_lists_are_tuples_and_a_none_weight_is_allowed():
    a = adapt(_items([np.zeros((2, 3)), np.zeros(2)], (np.zeros((2, 3)), np.zeros(2), None)))
    assert [xb.shape for xb, _ in _epoch(a)] == [(2, 3), (2, 3)]


def test_generator_rejects_y():
    with pytest.raises(ValueError, match="as a generator, `y` should not be passed"):
        adapt(_gen(2), np.zeros(2))


# ------------------------------------------------------------------------------------------ PyDataset
def test_pydataset_epochs_hooks_and_shuffle():
    seq = Seq()
    a = adapt(seq, batch_size=32)
    assert (a.num_batches, a.kind) == (3, "PyDataset")
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [0, 1, 2]
    assert seq.events == ["begin", "end"]
    utils.set_random_seed(0)
    orders = {tuple(int(xb[0, 0]) for xb, _ in _epoch(adapt(Seq(count=6), shuffle=True))) for _ in range(4)}
    assert all(sorted(o) == list(range(6)) for o in orders) and len(orders) > 1


def test_pydataset_with_steps_continues_as_keras():
    a = adapt(Seq(), steps=2)
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [0, 1]
    with pytest.warns(UserWarning, match="ran out of data"):
        assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [2]
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [0, 1]


def test_pydataset_workers_read_ahead_on_threads_that_end():
    seq = Seq(count=8, workers=3, max_queue_size=2)
    a = adapt(seq)
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == list(range(8))  # in order
    assert any(name.startswith("gpucnn-worker") for name in seq.threads)
    assert _gpucnn_threads() == []


def test_pydataset_errors_surface_with_and_without_workers():
    for workers in (1, 2):
        a = adapt(Seq(count=4, fail_at=2, workers=workers))
        with pytest.raises(IndexError, match="no such batch"):
            _epoch(a)
        assert _gpucnn_threads() == []


def test_endless_pydataset_with_steps():
    class Endless(Seq):
        @property
        def num_batches(self):
            return None

    a = adapt(Endless(), steps=4)
    assert a.num_batches == 4
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [0, 1, 2, 3]
    assert [int(xb[0, 0]) for xb, _ in _epoch(a)] == [4, 5, 6, 7]


def test_pydataset_without_super_init_warns_as_keras():
    class Lazy(PyDataset):
        def __init__(self):
            self.size = 1  # no super().__init__()

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return np.zeros((1, 2)), np.zeros(1)

    with pytest.warns(UserWarning, match=r"should call `super\(\).__init__\(\*\*kwargs\)`"):
        assert len(_epoch(adapt(Lazy()))) == 1


def test_a_list_of_batches_is_a_sequence():
    batches = [(np.zeros((2, 3)), np.zeros(2)), (np.ones((1, 3)), np.ones(1))]
    a = adapt(batches)
    assert a.num_batches == 2 and [len(xb) for xb, _ in _epoch(a)] == [2, 1]


# ------------------------------------------------------------------------------------------ image datasets
def _gpucnn_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("gpucnn-")]


def test_image_dataset_through_the_adapter(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.new("RGB", (12 + i, 10), (40 * i, 0, 200 if cls == "dogs" else 0)).save(tmp_path / cls / f"{i}.png")
    from gpucnn.data import image_dataset_from_directory
    ds = image_dataset_from_directory(tmp_path, image_size=(6, 6), batch_size=4, seed=2, label_mode="binary",
                                      verbose=False)
    with adapt(ds, steps=2) as a:
        assert a.num_batches == 2
        batches = _epoch(a)
        assert [xb.shape for xb, _ in batches] == [(4, 6, 6, 3)] * 2
        assert all(yb.dtype == np.float32 and yb.shape == (4, 1) for _, yb in batches)
        for xb, yb in batches:  # blue means dog
            np.testing.assert_array_equal(yb[:, 0], (xb[:, 0, 0, 2] > 100).astype(np.float32))
        assert _gpucnn_threads()  # the pass stays open for the next epoch's steps
    assert _gpucnn_threads() == []  # close() ends it
    a = adapt(ds)
    for _ in a.batches(0):
        break  # an epoch left early
    assert _gpucnn_threads() == []
    assert sum(len(xb) for xb, _ in _epoch(a, 1)) == 10


def test_an_unbatched_image_dataset_is_refused(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (5, 5)).save(tmp_path / cls / "0.png")
    from gpucnn.data import image_dataset_from_directory
    ds = image_dataset_from_directory(tmp_path, batch_size=None, image_size=(4, 4), verbose=False)
    with pytest.raises(ValueError, match="single images"):
        adapt(ds)
