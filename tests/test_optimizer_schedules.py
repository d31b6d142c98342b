"""Learning-rate schedules in the optimizers (gpucnn/optimizers.py): the rate each step of ``fit`` reads is the
schedule's formula at Keras's step count (0 for the first update), Adam's with its bias correction;
``optimizer.learning_rate`` reads and sets as Keras's; configs and saved models keep the schedule; a bad rate
is a clear error. On the NumPy engine (tests/test_fastpath.py checks the fast path's rate table)."""
import math

import numpy as np
import pytest

from gpucnn import callbacks, layers, models, optimizers
from gpucnn.optimizers import schedules
from gpucnn.saving import InvalidModelFile

pytestmark = pytest.mark.usefixtures("numpy_engine")

SCHEDULES = {
    "exponential": lambda: schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5),
    "staircase": lambda: schedules.ExponentialDecay(0.1, decay_steps=3, decay_rate=0.5, staircase=True),
    "piecewise": lambda: schedules.PiecewiseConstantDecay([2, 5], [0.1, 0.05, 0.01]),
    "cosine": lambda: schedules.CosineDecay(0.1, decay_steps=7, alpha=0.1),
    "cosine_warmup": lambda: schedules.CosineDecay(0.0, decay_steps=5, warmup_target=0.2, warmup_steps=3),
}


def formula(name, step):
    """Keras's formulas written out for the schedules above, at update ``step`` (0 for the first)."""
    if name == "exponential":
        return 0.1 * 0.5 ** (step / 3)
    if name == "staircase":
        return 0.1 * 0.5 ** (step // 3)
    if name == "piecewise":
        return 0.1 if step <= 2 else 0.05 if step <= 5 else 0.01
    if name == "cosine":
        s = min(step, 7)
        return 0.1 * (0.9 * 0.5 * (1 + math.cos(math.pi * s / 7)) + 0.1)
    s = min(step, 8)  # cosine_warmup: linear from 0 to 0.2 over 3 steps, then cosine over 5
    if s < 3:
        return 0.2 * s / 3
    return 0.2 * 0.5 * (1 + math.cos(math.pi * (s - 3) / 5))


def small_model(optimizer):
    model = models.Sequential([layers.Input((4, 4, 1)), layers.Conv2D(2, 3, activation="relu"), layers.Flatten(),
                               layers.Dense(3, activation="softmax")])
    model.compile(optimizer, "sparse_categorical_crossentropy")
    return model


def data(n=20):
    r = np.random.default_rng(0)
    return r.standard_normal((n, 4, 4, 1)).astype(np.float32), r.integers(0, 3, n)


def record_rates(optimizer):
    """The rate the update op reads at each step (``rates[counter[0]]``), appended to the returned list."""
    seen = []
    update = optimizer.update

    def spy(params, grads, rates, counter, factors=None):
        seen.append(float(rates[int(counter[0])]))
        update(params, grads, rates, counter, factors)
    optimizer.update = spy
    return seen


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", ["sgd", "rmsprop", "adam"])
def test_each_step_of_fit_reads_the_schedules_rate(name, kind):
    opt = {"sgd": optimizers.SGD, "rmsprop": optimizers.RMSprop, "adam": optimizers.Adam}[kind](SCHEDULES[name]())
    model = small_model(opt)
    seen = record_rates(opt)
    x, y = data(20)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)  # 10 steps, across the epoch boundary
    want = []
    for step in range(10):
        lr = formula(name, step)
        if kind == "adam":  # Keras's Adam: the step's rate with the bias correction of update step + 1
            t = step + 1
            lr = lr * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        want.append(np.float32(lr))
    np.testing.assert_allclose(seen, want, rtol=1e-6, atol=1e-9)
    assert opt.iterations == 10
    assert opt.learning_rate == pytest.approx(formula(name, 10), rel=1e-12)


def test_a_schedule_trains_as_its_rates_one_step_at_a_time():
    """Two SGD steps under a schedule of 0.5 then 0.125 give the weights of one step at 0.5 followed by one at
    0.125 (read from the weights, not from the optimizer)."""
    x, y = data(8)
    scheduled = small_model(optimizers.SGD(schedules.PiecewiseConstantDecay([0], [0.5, 0.125])))
    weights = scheduled.get_weights()
    for lr in (0.5, 0.125):
        plain = small_model(optimizers.SGD(lr))
        plain.set_weights(weights)
        plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        weights = plain.get_weights()
    scheduled.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for got, want in zip(scheduled.get_weights(), weights):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_function_of_no_arguments_is_a_learning_rate():
    calls = []

    def rate():
        calls.append(1)
        return 0.01 * len(calls)
    opt = optimizers.SGD(rate)
    seen = record_rates(opt)
    model = small_model(opt)
    model.fit(*data(12), batch_size=4, verbose=0)
    assert seen == pytest.approx([0.01, 0.02, 0.03], rel=1e-6)
    with pytest.raises(TypeError, match="takes arguments: a function learning rate is called with none"):
        optimizers.Adam(lambda step: 1e-3)


def test_the_learning_rate_reads_and_sets_as_keras():
    opt = optimizers.SGD(0.1)
    assert opt.learning_rate == 0.1 and opt.schedule is None
    opt.learning_rate = 0.05
    assert opt.learning_rate == 0.05
    opt.learning_rate = np.float32(0.25)
    assert opt.learning_rate == 0.25 and float(opt.learning_rate) == 0.25
    opt.learning_rate = 0.1  # kept as Keras keeps it, a float32: what a callback reads is what the update uses
    assert float(opt.learning_rate) == float(np.float32(0.1)) != 0.1 and opt.learning_rate == 0.1
    with pytest.raises(ValueError, match="finite number >= 0"):
        opt.learning_rate = 1e39  # finite in float64, infinite in float32
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match="finite number >= 0"):
            opt.learning_rate = bad
    with pytest.raises(TypeError, match="must be a number"):
        opt.learning_rate = "0.1"
    decay = schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    opt.learning_rate = decay  # a schedule may replace a number (Keras)
    assert opt.schedule is decay and opt.learning_rate == 0.1
    opt.iterations = 10
    assert opt.learning_rate == pytest.approx(0.05)
    with pytest.raises(TypeError, match="is a schedule .* cannot be set to a number"):
        opt.learning_rate = 0.01
    with pytest.raises(TypeError, match="is a schedule .* cannot be set to a number"):
        opt.learning_rate.assign(0.01)


def test_the_learning_rate_answers_kerass_variable_methods():
    """Keras 3's learning_rate is a float32 variable: ``optimizer.learning_rate.assign(0.01)`` (callbacks written for
    Keras 3 do this) and ``.numpy()`` work, it computes and compares as a float32, and a reference kept to it is live:
    it reads the rate set since (a callback that keeps it at train begin and halves it each epoch)."""
    opt = optimizers.Adam(0.01)
    rate = opt.learning_rate
    assert rate.numpy() == np.float32(0.01) and rate.numpy().dtype == np.float32 and rate * 2 == 0.02
    assert rate > 0.005 and not rate < 0.01 and f"{rate:.3f}" == "0.010" and str(rate) == "0.01"
    assert np.asarray(rate).dtype == np.float32 and int(opt.iterations) == 0
    assert (rate.dtype, rate.shape) == ("float32", ())  # Keras's variable's, by name; read-only as Keras's
    with pytest.raises(AttributeError):
        rate.dtype = "float16"
    rate.assign(0.5)
    assert rate == 0.5 and opt.learning_rate == 0.5 and float(opt.learning_rate) == 0.5
    rate.assign(float(rate) * 0.5)
    assert float(rate) == 0.25 == float(opt.learning_rate)
    with pytest.raises(ValueError, match="finite number >= 0"):
        opt.learning_rate.assign(-1)
    import copy
    import pickle
    for again in (copy.copy(rate), copy.deepcopy(rate), pickle.loads(pickle.dumps(rate))):
        assert type(again) is float and again == 0.25  # a History holding it saves and loads as a float
    steps = opt.iterations
    opt.iterations = 7
    assert steps == 7 and steps + 1 == 8 and list(range(steps))[-1] == 6  # live too
    decay = schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    opt.learning_rate = decay
    then = opt.learning_rate  # with a schedule, the rate at that step (a value, as Keras's)
    opt.iterations = 17
    assert then == pytest.approx(0.1 * 0.5 ** 0.7) and opt.learning_rate == pytest.approx(0.1 * 0.5 ** 1.7)


def test_the_variables_compute_with_any_number_as_keras_variables_do():
    """A step count with floats (a warm-up callback's ``steps < 1e3``, ``0.96 ** steps``), the rate against a float64
    or a Python float (compared in float32, Keras's rule, whatever NumPy's own promotion), math's rounding."""
    opt = optimizers.SGD(0.1)
    opt.iterations = 100
    steps = opt.iterations
    assert steps == 100.0 and not steps != 100.0 and steps in (100.0,) and steps < 1e3 and steps > 50.0
    assert steps * 0.5 == 50.0 and 0.5 * steps == 50.0 and steps / 1000.0 == 0.1 and 0.96 ** steps == 0.96 ** 100
    assert math.exp(-0.01 * steps) == math.exp(-1.0) and divmod(steps, 7) == (14, 2) and divmod(250, steps) == (2, 50)
    assert steps & 4 == 4 and 1 << steps == 2 ** 100 and steps // 3 == 33 and steps % 7 == 2 and -steps == -100
    rate = opt.learning_rate
    assert rate == 0.1 and rate <= 0.1 and rate >= 0.1 and rate == np.float64(0.1) and rate <= np.float64(0.1)
    assert not rate < 0.1 and rate != 0.2 and rate * np.float64(2) == np.float32(0.2)
    lr, halvings = rate, 0  # "halve while above 0.0125": 3 halvings in float32, as Keras
    while lr > 0.0125:
        lr, halvings = lr * 0.5, halvings + 1
    assert halvings == 3
    assert math.floor(rate) == 0 and math.ceil(rate) == 1 and math.trunc(rate) == 0 and round(rate, 2) == 0.1
    assert round(steps) == 100 and int(rate * 100) == 10
    # an array, a 0-d array or a complex keeps NumPy's promotion (Keras's too): float64 both ways, nothing lost
    assert (rate * np.ones(2)).dtype == (np.ones(2) * rate).dtype == np.float64
    assert rate + np.array(1e-9) == float(np.float32(0.1)) + 1e-9 and rate * np.complex64(1j) == 1j * np.float32(0.1)


def test_gpucnns_own_checks_take_the_variables_and_keep_their_value_of_the_moment():
    opt = optimizers.SGD(0.1)
    opt.iterations = 20
    decay = schedules.CosineDecay(opt.learning_rate, 100)
    assert decay(opt.iterations) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    steps = schedules.PiecewiseConstantDecay([opt.iterations], [opt.learning_rate, opt.learning_rate * 0.1])
    opt.iterations, opt.learning_rate = 50, 0.5
    assert decay.initial_learning_rate == pytest.approx(0.1) and steps.boundaries == [20]  # not live
    assert type(steps.boundaries[0]) is int and steps(30) == pytest.approx(0.01)
    assert layers.ReLU(max_value=opt.learning_rate).max_value == 0.5
    opt.learning_rate = 0.25
    assert layers.Dropout(opt.learning_rate).rate == 0.25 and layers.RandomRotation(opt.learning_rate).factor == (-0.25, 0.25)


def test_a_number_learning_rate_is_a_float32_from_the_constructor_on():
    """Keras's variable holds float32: the constructor's rate too (get_config gives Keras's number); a rate past
    float32's range is refused there as by assignment."""
    assert optimizers.SGD(0.1).get_config()["learning_rate"] == float(np.float32(0.1))
    with pytest.raises(ValueError, match="finite number >= 0"):
        optimizers.SGD(1e39)


def test_reduce_lr_on_plateau_refuses_a_schedule_as_keras():
    model = small_model(optimizers.SGD(schedules.ExponentialDecay(0.1, 10, 0.5)))
    with pytest.raises(TypeError, match="is a schedule"):
        model.fit(*data(8), batch_size=4, epochs=3, verbose=0,
                  callbacks=[callbacks.ReduceLROnPlateau(monitor="loss", patience=0, min_delta=10)])


class Halving(schedules.LearningRateSchedule):
    def __init__(self, start):
        self.start = start

    def __call__(self, step):
        return self.start / 2 ** step

    def get_config(self):
        return {"start": self.start}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_configs_and_saved_models_keep_the_schedule(kind, tmp_path):
    cls = optimizers.OPTIMIZERS[kind]
    opt = cls(schedules.CosineDecay(0.1, 50, alpha=0.2, warmup_target=0.3, warmup_steps=5))
    config = opt.get_config()
    assert config["learning_rate"] == {"class_name": "CosineDecay", "config": {
        "initial_learning_rate": 0.1, "decay_steps": 50, "alpha": 0.2, "name": "CosineDecay", "warmup_target": 0.3,
        "warmup_steps": 5}}
    again = cls.from_config(config)
    assert [again._rate(t) for t in range(1, 60)] == [opt._rate(t) for t in range(1, 60)]
    model = small_model(opt)
    x, y = data(12)
    model.fit(x, y, batch_size=4, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer.schedule, schedules.CosineDecay)
    assert loaded.optimizer.iterations == 3 and loaded.optimizer.learning_rate == opt.learning_rate
    for m in (loaded, model):
        m.fit(x, y, batch_size=4, verbose=0, shuffle=False)
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_schedule_of_ones_own_saves_with_custom_objects_and_a_function_does_not(tmp_path):
    model = small_model(optimizers.SGD(Halving(0.2)))
    model.fit(*data(8), batch_size=4, verbose=0)
    model.save(tmp_path / "own.keras")
    with pytest.raises(InvalidModelFile, match="unknown learning rate schedule 'Halving'"):
        models.load_model(tmp_path / "own.keras")
    loaded = models.load_model(tmp_path / "own.keras", custom_objects={"Halving": Halving})
    assert isinstance(loaded.optimizer.schedule, Halving) and loaded.optimizer.learning_rate == pytest.approx(0.05)
    with pytest.raises(ValueError, match="learning_rate is the function .* a file cannot hold"):
        small_model(optimizers.SGD(lambda: 0.1)).save(tmp_path / "f.keras")
    assert not (tmp_path / "f.keras").exists()


def test_register_keras_serializable_loads_ones_own_schedule_and_layer_without_custom_objects(tmp_path):
    """Keras's decorator, as keras.io writes it (keras.saving.register_keras_serializable, also in keras.utils)."""
    import gpucnn as keras
    from gpucnn import saving

    @keras.saving.register_keras_serializable(package="Mine")
    class Thirds(schedules.LearningRateSchedule):
        def __init__(self, start):
            self.start = start

        def __call__(self, step):
            return self.start / 3 ** step

        def get_config(self):
            return {"start": self.start}

    @keras.utils.register_keras_serializable(name="twice")
    class Twice(layers.Layer):
        def forward(self, x, training, ctx):
            return 2 * x

        def backward(self, dy, ctx):
            return 2 * dy

    try:
        model = models.Sequential([layers.Input((4, 4, 1)), Twice(), layers.Flatten(), layers.Dense(3, activation="softmax")])
        model.compile(optimizers.SGD(Thirds(0.3)), "sparse_categorical_crossentropy")
        x, y = data(8)
        model.fit(x, y, batch_size=4, verbose=0)
        model.save(tmp_path / "m.keras")
        loaded = models.load_model(tmp_path / "m.keras")
        assert type(loaded.layers[0]) is Twice and isinstance(loaded.optimizer.schedule, Thirds)
        assert loaded.optimizer.learning_rate == pytest.approx(0.3 / 9)
        np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
        assert saving.get_registered_name(Thirds) == "Mine>Thirds" and saving.get_registered_name(Twice()) == "Custom>twice"
        assert saving.get_registered_object("Mine>Thirds") is Thirds and saving.get_registered_object("Twice") is Twice

        @keras.saving.register_keras_serializable(package="Mine")
        class Thirds(schedules.LearningRateSchedule):  # the notebook cell run again: the new class
            pass

        assert saving.get_registered_object("Mine>Thirds") is Thirds is saving.get_registered_object("Thirds")
    finally:
        saving._registered.pop("Twice", None), saving._registered_schedules.pop("Thirds", None)
    with pytest.raises(ValueError, match="name of gpucnn's built-in schedule CosineDecay"):
        keras.saving.register_keras_serializable()(type("CosineDecay", (schedules.LearningRateSchedule,), {}))
    with pytest.raises(TypeError, match="your own Layer and LearningRateSchedule subclasses"):
        keras.saving.register_keras_serializable()(print)


def test_a_saved_schedule_that_makes_no_sense_is_refused(tmp_path):
    import json
    import zipfile

    model = small_model(optimizers.SGD(schedules.ExponentialDecay(0.1, 10, 0.5)))
    model.save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    header = json.loads(members["model.json"])
    header["compile_config"]["optimizer"]["config"]["learning_rate"]["config"]["decay_steps"] = -3
    members["model.json"] = json.dumps(header).encode()
    with zipfile.ZipFile(tmp_path / "bad.keras", "w") as zf:
        for name, raw in members.items():
            zf.writestr(name, raw)
    with pytest.raises(InvalidModelFile, match="decay_steps must be > 0"):
        models.load_model(tmp_path / "bad.keras")


@pytest.mark.parametrize("rate, match", [
    (schedules.PiecewiseConstantDecay([2], [0.1, 0.1]), None),
    (Halving(float("inf")), r"Halving\(start=inf\) gives at step 0 is inf"),
    (lambda: float("nan"), "the learning rate that <lambda>\\(\\) returns is nan"),
])
def test_a_schedule_that_gives_a_non_finite_rate_stops_fit_with_a_clear_error(rate, match):
    model = small_model(optimizers.Adam(rate))
    if match is None:
        model.fit(*data(8), batch_size=4, verbose=0)
        return
    w0 = model.get_weights()
    with pytest.raises(ValueError, match=match):
        model.fit(*data(8), batch_size=4, verbose=0)
    for got, want in zip(model.get_weights(), w0):  # nothing was applied
        np.testing.assert_array_equal(got, want)


def test_keras_optimizers_schedules_is_there():
    import gpucnn as keras

    lr = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=10000, decay_rate=0.9)
    assert keras.optimizers.SGD(learning_rate=lr).learning_rate == pytest.approx(1e-2)


def test_adamw_is_adam_after_decoupled_weight_decay():
    """One AdamW step on a flat buffer = the float64 oracle's weight decay (with that step's rate), then its Adam
    step; weight_decay goes through the config; AdamW needs a weight decay."""
    import reference as ref
    rng = np.random.default_rng(0)
    w = rng.standard_normal(50).astype(np.float32)
    w_ref, m_ref, v_ref = w.astype(np.float64), np.zeros(50), np.zeros(50)
    decay = schedules.ExponentialDecay(0.05, 1, 0.5)
    opt = optimizers.AdamW(decay, weight_decay=0.3)
    for t in range(1, 4):
        g = rng.standard_normal(50).astype(np.float32)
        opt.apply(w, g)
        lr = 0.05 * 0.5 ** (t - 1)
        w_ref = ref.weight_decay(w_ref, lr, 0.3)
        w_ref, m_ref, v_ref = ref.adam_update(w_ref, g, m_ref, v_ref, lr, 0.9, 0.999, 1e-7, t)
        np.testing.assert_allclose(w, w_ref, rtol=2e-6, atol=1e-7)
    config = opt.get_config()
    assert config["name"] == "adamw" and config["weight_decay"] == 0.3
    again = optimizers.AdamW.from_config(dict(config, learning_rate=0.01))
    assert again.weight_decay == 0.3 and optimizers.get("adamw").weight_decay == 0.004
    assert optimizers.SGD(weight_decay=0.1).get_config()["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="weight_decay must be a number"):
        optimizers.AdamW(weight_decay=None)
    with pytest.raises(ValueError, match="weight_decay must be None or a number >= 0"):
        optimizers.Adam(weight_decay=-1)
    with pytest.raises(ValueError, match="weight_decay must be None or a number >= 0"):
        optimizers.SGD(weight_decay=True)
    with pytest.raises(TypeError):  # Keras's fifth is amsgrad: weight_decay is by keyword only
        optimizers.Adam(1e-3, 0.9, 0.999, 1e-7, True)


def test_weights_excluded_from_weight_decay_are_left_alone_by_it():
    """exclude_from_weight_decay(var_names=...) and (var_list=...): those weights are not decayed, the others are;
    with a zero learning-rate gradient (lr 0 for the update, but not for the decay) only decay moves weights."""
    from gpucnn import layers, models
    m = models.Sequential([layers.Input((3,)), layers.Dense(4, bias_initializer="ones"), layers.BatchNormalization(),
                           layers.Dense(2, activation="softmax", bias_initializer="ones")])
    opt = optimizers.SGD(0.1, weight_decay=0.5)
    m.compile(opt, "sparse_categorical_crossentropy")
    m._adopt_weights()
    kept = [np.asarray(w).copy() for w in m.get_weights()]
    grads = np.zeros_like(m._params)
    opt.exclude_from_weight_decay(var_names=["bias", "gam"])
    opt.apply(m._params, grads)
    names = [layer.weight_names[i] for layer, i in m._weight_slots()]
    for name, before, after in zip(names, kept, m.get_weights()):
        if name in ("bias", "gamma") or name.startswith("moving"):
            np.testing.assert_array_equal(after, before, err_msg=name)
        else:
            np.testing.assert_allclose(after, before * (1 - 0.5 * 0.1), rtol=1e-6, err_msg=name)
    opt.exclude_from_weight_decay(var_list=[m.layers[0].weights[0]])
    before = m.layers[0].get_weights()[0].copy()
    opt.apply(m._params, grads)
    np.testing.assert_array_equal(m.layers[0].get_weights()[0], before)
    assert np.abs(m.layers[0].get_weights()[1] - 0.95).max() < 1e-6  # the bias decays again (a new call replaces)


@pytest.mark.parametrize("kind", ["SGD", "RMSprop", "Adam", "AdamW"])
def test_kerass_other_optimizer_arguments_are_taken_at_their_defaults_and_named_otherwise(kind):
    make = getattr(optimizers, kind)
    defaults = dict(clipnorm=None, clipvalue=None, global_clipnorm=None, use_ema=False, ema_momentum=0.99,
                    ema_overwrite_frequency=None, loss_scale_factor=None, gradient_accumulation_steps=None,
                    name=make.name)
    assert make(**defaults).get_config() == make().get_config()
    assert make(name="my_optimizer").get_config() == make().get_config()  # a name of one's own is taken
    for key, value in (("clipnorm", 1.0), ("clipvalue", 0.5), ("global_clipnorm", 1.0), ("use_ema", True)):
        with pytest.raises(NotImplementedError, match=f"{kind}\\({key}=.*not supported by gpucnn yet; leave {key} out"):
            make(**{key: value})
    with pytest.raises(TypeError, match=f"Keras 2's name: write {kind}\\(learning_rate=0.1\\)"):
        make(lr=0.1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentun'"):
        make(momentun=0.9)
    if kind.startswith("Adam"):
        make(amsgrad=False)
        with pytest.raises(NotImplementedError, match="amsgrad=True"):
            make(amsgrad=True)
    else:
        with pytest.raises(TypeError, match="unexpected keyword argument 'amsgrad'"):
            make(amsgrad=False)


def test_a_learning_rate_of_zero_is_taken_as_keras_takes_it():
    model = models.Sequential([layers.Input((3,)), layers.Dense(2, activation="softmax")])
    before = model.get_weights()
    model.compile(optimizers.SGD(learning_rate=0.0, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(np.ones((4, 3), np.float32), np.arange(4) % 2, verbose=0)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="learning_rate must be a number >= 0"):
        optimizers.Adam(learning_rate=-0.1)


def test_weights_excluded_from_decay_as_the_arrays_a_layer_holds_stay_excluded():
    """var_list may hold the arrays a layer holds, given before compile: packing the weights into one buffer
    replaces those arrays with views, so the optimizer names them by their weight first; they stay excluded
    through re-layouts (a frozen layer) and in a saved file."""
    from gpucnn import layers, models
    m = models.Sequential([layers.Input((3,)), layers.Dense(4, name="keep"), layers.Dense(4, name="decay"),
                           layers.Dense(2, activation="softmax")])
    opt = optimizers.SGD(0.1, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=[m.get_layer("keep").weights[0]])
    m.compile(opt, "sparse_categorical_crossentropy")
    for freeze in (False, True):
        m.layers[-1].trainable = not freeze
        m._adopt_weights()
        kept, decayed = m.get_layer("keep").get_weights()[0], m.get_layer("decay").get_weights()[0]
        opt.apply(m._params, np.zeros_like(m._params))
        np.testing.assert_array_equal(m.get_layer("keep").get_weights()[0], kept)
        np.testing.assert_allclose(m.get_layer("decay").get_weights()[0], decayed * (1 - 0.05), rtol=1e-6)
    assert opt.decay_exclusions(m._weight_slots())["weights"] == [["keep", 0]]


def test_a_step_with_every_weight_frozen_counts_no_iteration():
    """Keras applies nothing, and counts no step, when no weight trains: a schedule and Adam's bias correction go on
    from where they were once a layer is unfrozen."""
    from gpucnn import layers, models
    m = models.Sequential([layers.Input((3,)), layers.Dense(2, activation="softmax")])
    m.compile(optimizers.Adam(), "sparse_categorical_crossentropy")
    x, y = np.ones((8, 3), np.float32), np.arange(8) % 2
    m.fit(x, y, batch_size=4, verbose=0)
    m.trainable = False
    m.fit(x, y, batch_size=4, verbose=0)
    assert m.optimizer.iterations == 2
    m.trainable = True
    m.fit(x, y, batch_size=4, verbose=0)
    assert m.optimizer.iterations == 4


def test_an_array_of_var_list_taken_before_another_model_laid_the_layer_out_still_names_its_weight():
    """Laying weights out for training replaces a layer's arrays with views of a flat buffer: an array taken before
    (by another model's fit, here) still names its weight, which stays excluded; an array of another model's layer
    is taken as Keras takes a variable the model does not have (it excludes nothing here)."""
    from gpucnn import layers, models
    a = models.Sequential([layers.Input((3,)), layers.Dense(4, name="keep"), layers.Dense(2, activation="softmax")])
    b = models.Sequential([layers.Input((3,)), layers.Dense(2, name="elsewhere")])
    taken = a.get_layer("keep").weights[0]
    wrapper = models.Sequential([a])
    wrapper.compile("adam", "sparse_categorical_crossentropy")
    wrapper.fit(np.ones((4, 3), np.float32), np.arange(4) % 2, verbose=0)  # lays the weights out anew
    assert a.get_layer("keep").weights[0] is not taken
    opt = optimizers.AdamW(0.01, weight_decay=0.5)
    opt.exclude_from_weight_decay(var_list=[taken, b.get_layer("elsewhere").weights[0]])
    a.compile(opt, "sparse_categorical_crossentropy")
    assert opt.decay_exclusions(a._weight_slots())["weights"] == [["keep", 0]]
    again = a.get_layer("keep").weights[0]  # a's view: taken, then wrapper's fit takes the layer back
    wrapper.fit(np.ones((4, 3), np.float32), np.arange(4) % 2, verbose=0)
    opt.exclude_from_weight_decay(var_list=[again])
    assert opt.decay_exclusions(a._weight_slots())["weights"] == [["keep", 0]]
    kept, decayed = a.get_layer("keep").get_weights()[0], a.layers[-1].get_weights()[0]
    a._adopt_weights()
    opt.apply(a._params, np.zeros_like(a._params))  # no gradient: only the decay moves weights
    np.testing.assert_array_equal(a.get_layer("keep").get_weights()[0], kept)
    np.testing.assert_allclose(a.layers[-1].get_weights()[0], decayed * (1 - 0.5 * 0.01), rtol=1e-6)


def test_iterations_answer_kerass_variable_methods():
    opt = optimizers.SGD()
    opt.iterations.assign(10)
    assert opt.iterations == 10 and opt.iterations.numpy() == 10 and isinstance(opt.iterations.numpy(), np.integer)
    opt.iterations.assign_add(2)
    opt.iterations.assign(np.array(13.0))  # (Keras takes any whole number)
    assert opt.iterations == 13
    opt.iterations = 2**53 + 1  # exactly, and on from there
    opt.iterations.assign_add(1)
    assert opt.iterations == 2**53 + 2
    opt.iterations = np.int64(2**62 - 1)
    assert opt.iterations == 2**62 - 1
    for bad in (-1, 2.5, 2**62, 10**400, "3", b"3", True):
        with pytest.raises(ValueError, match="iterations must be a whole number from 0 to 2\\*\\*62 - 1"):
            opt.iterations = bad
