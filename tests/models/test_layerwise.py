"""Layer-wise SAM: selection, truncated ascent, reduction to SAM and to the base optimizer."""

import re

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam.models.layerwise import LayerwiseSAM
from keras_sam.ops import add_perturbation
from tests import numpy_reference as ref
from tests.helpers import (
    assert_weights_close,
    bn_dropout_model,
    classification_data,
    compiled_step_only,
    keras_mlp,
    logits_loss,
    multi_step_execution,
    plain_model,
)
from tests.models import layerwise_reference as lw_ref

RNG = np.random.default_rng(11)
X = RNG.normal(size=(8, 3)).astype("float32")
Y = RNG.normal(size=(8, 2)).astype("float32")
NEVER = 10**9  # reselect_every that keeps the initial selection


def _mlp_trainer(params, chosen, radius="joint", rho=0.2, jit_compile=False, **kwargs):
    trainer = LayerwiseSAM(
        keras_mlp(params), rho=rho, num_layers=len(chosen), reselect_every=NEVER,
        radius=radius, layers=None, **kwargs,
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    mask = np.zeros(2, "float32")
    mask[list(chosen)] = 1.0
    trainer._selection.assign(mask)
    return trainer


# ---------------------------------------------------------------- numpy reference
@pytest.mark.parametrize(
    ("chosen", "radius", "jit_compile"),
    [
        ((1,), "joint", False),  # output layer: the ascent backward is cut above layer 0
        ((1,), "joint", True),
        ((0,), "joint", True),  # input layer: full backward, output layer unperturbed
        ((0, 1), "per_layer", False),
        ((1,), "scaled", False),  # ρ·√(n/n_S) on the output layer
        ((1,), "scaled", True),
        ((0, 1), "scaled", True),  # every layer: SAM's ρ
    ],
)
def test_step_with_fixed_selection_matches_numpy(chosen, radius, jit_compile):
    params = ref.init_params(seed=4)
    weights = np.array([1.0, 0.0, 2.0, 0.5, 1.0, 1.0, 3.0, 1.0], "float32")
    expected, norms = lw_ref.layerwise_sgd_step(
        params, X, Y, 0.1, 0.2, chosen, radius, sample_weight=weights
    )
    trainer = _mlp_trainer(params, chosen, radius, jit_compile=jit_compile)
    trainer.fit(X, Y, sample_weight=weights, batch_size=8, epochs=1, verbose=0)
    assert_weights_close(trainer.model.get_weights(), expected, atol=1e-6)
    # The ranking signal is the descent gradient's per-layer norm (first step: (1-β)·norm).
    np.testing.assert_allclose(
        list(trainer.layer_grad_norms.values()), 0.1 * np.array(norms), rtol=1e-5
    )


def test_rho_schedule():
    params = ref.init_params(seed=5)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([0], [0.3, 0.0])
    expected = lw_ref.layerwise_sgd_step(params, X, Y, 0.1, 0.3, (1,))[0]
    expected = ref.sam_sgd_step(expected, X, Y, 0.1, lambda p, g: [0 * t for t in g])
    trainer = _mlp_trainer(params, (1,), rho=schedule)
    trainer.fit(X, Y, batch_size=8, epochs=2, verbose=0)
    assert_weights_close(trainer.model.get_weights(), expected, atol=1e-6)


# ---------------------------------------------------------------- reductions
@pytest.mark.parametrize("jit_compile", [False, True])
def test_all_layers_equals_sam(jit_compile):
    """K = all layers is SAM, with BatchNorm and Dropout and a smaller last batch."""
    x, y = classification_data(n=40)
    results = []
    for trainer in (
        LayerwiseSAM(bn_dropout_model(), rho=0.1, num_layers=1.0, layers=None),
        keras_sam.SAM(bn_dropout_model(), rho=0.1),
    ):
        keras.utils.set_random_seed(5)
        trainer.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=logits_loss(),
            jit_compile=jit_compile,
        )
        trainer.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append(trainer.model.get_weights())
    assert_weights_close(*results, atol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_zero_layers_equals_base_optimizer(jit_compile):
    x, y = classification_data(n=40)
    results = []
    for wrap in (lambda m: LayerwiseSAM(m, rho=0.5, num_layers=0), lambda m: m):
        model = wrap(bn_dropout_model())
        keras.utils.set_random_seed(5)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=logits_loss(),
            jit_compile=jit_compile,
        )
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
        results.append((model.model if isinstance(model, LayerwiseSAM) else model).get_weights())
    assert_weights_close(*results, atol=1e-6)


# ---------------------------------------------------------------- the perturbation
@pytest.mark.parametrize("radius", ["joint", "per_layer", "scaled"])
def test_perturbation_touches_only_chosen_layers(radius):
    model = bn_dropout_model()
    trainer = LayerwiseSAM(model, rho=0.3, num_layers=2, radius=radius, layers=None)
    trainer.compile(optimizer="sgd", loss=logits_loss())
    assert trainer.candidate_layers == ["dense_in", "bn", "dense_out"]
    trainer._selection.assign(np.array([1.0, 0.0, 1.0], "float32"))
    assert trainer.selected_layers == ["dense_in", "dense_out"]
    variables = trainer.trainable_variables
    rng = np.random.default_rng(0)
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    eps = trainer.perturbation(grads, variables)
    to_numpy = keras.ops.convert_to_numpy
    values = [to_numpy(v.value) for v in variables]
    perturbed = [to_numpy(p) for p in add_perturbation([v.value for v in variables], eps)]
    norms = {}
    for v, w, p, e in zip(variables, values, perturbed, eps):
        layer = v.path.split("/")[-2]
        if layer == "bn":
            assert np.array_equal(p.view("uint32"), w.view("uint32")), v.path  # bit-identical
        else:
            norms[layer] = norms.get(layer, 0.0) + float(np.sum(np.square(to_numpy(e))))
            np.testing.assert_allclose(p - w, e, atol=1e-6)
    if radius == "joint":
        np.testing.assert_allclose(np.sqrt(sum(norms.values())), 0.3, rtol=1e-5)
    elif radius == "scaled":
        sizes = {}
        for v in variables:
            sizes[v.path.split("/")[-2]] = sizes.get(v.path.split("/")[-2], 0) + np.prod(v.shape)
        scale = np.sqrt(sum(sizes.values()) / (sizes["dense_in"] + sizes["dense_out"]))
        np.testing.assert_allclose(np.sqrt(sum(norms.values())), 0.3 * scale, rtol=1e-5)
    else:
        np.testing.assert_allclose(np.sqrt(list(norms.values())), [0.3, 0.3], rtol=1e-5)


def test_restricted_candidates_leave_other_variables_alone():
    trainer = LayerwiseSAM(bn_dropout_model(), rho=0.3, num_layers=1.0, layers=["dense_out"])
    trainer.compile(optimizer="sgd", loss=logits_loss())
    variables = trainer.trainable_variables
    eps = trainer.perturbation([np.ones(v.shape, "float32") for v in variables], variables)
    touched = [v.path for v, e in zip(variables, eps) if e is not None]
    assert touched and all("dense_out" in path for path in touched)


def test_zero_gradient_gives_zero_perturbation():
    trainer = LayerwiseSAM(plain_model(), num_layers=1)
    trainer.compile(optimizer="sgd", loss=logits_loss())
    variables = trainer.trainable_variables
    eps = trainer.perturbation([np.zeros(v.shape, "float32") for v in variables], variables)
    assert all(np.all(keras.ops.convert_to_numpy(e) == 0.0) for e in eps if e is not None)


# ---------------------------------------------------------------- ranking and schedule
class _Scaled(keras.layers.Dense):
    """A Dense layer on 100·x with a kernel 100× smaller: same function, ×100 kernel gradient."""

    def call(self, inputs):
        return super().call(100.0 * inputs)


class CountingLayerwiseSAM(LayerwiseSAM):
    traces = 0

    def _step(self, data):
        type(self).traces += 1  # Python side effect: runs once per trace
        return super()._step(data)


def _scaled_middle_model():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, activation="tanh", name="first")(inputs)
    h = _Scaled(8, activation="tanh", name="scaled",
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.003))(h)
    h = keras.layers.Dense(8, activation="tanh", name="third")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="last")(h))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_largest_gradient_layer_is_chosen_on_schedule_without_retracing(jit_compile):
    x, y = classification_data(n=32)
    CountingLayerwiseSAM.traces = 0
    trainer = CountingLayerwiseSAM(
        _scaled_middle_model(), rho=0.05, num_layers=1, reselect_every=3, max_cuts=4,
        layers=None,
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.01), loss=logits_loss(),
                    jit_compile=jit_compile)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(trainer.selected_layers)
    )
    trainer.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[record])
    # Output side until the first re-selection after step 3, then the ×100 layer.
    assert seen[:2] == [["last"]] * 2
    assert seen[2:] == [["scaled"]] * 10
    assert max(trainer.layer_grad_norms, key=trainer.layer_grad_norms.get) == "scaled"
    traced = jit_compile or keras.backend.backend() == "tensorflow"  # JAX without jit: eager
    if traced:
        assert CountingLayerwiseSAM.traces == 2  # one step per cut depth: top, then layer 1
    # Back to the first selection: both steps exist already; nothing is traced again.
    trainer._selection.assign(np.array([0.0, 0.0, 0.0, 1.0], "float32"))
    seen.clear()
    trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    assert seen == [["last"]] * 2 + [["scaled"]] * 2  # iterations 12 -> 16: due after 15
    if traced:
        assert CountingLayerwiseSAM.traces == 2


@multi_step_execution
def test_reselection_with_steps_per_execution_happens_between_executions():
    x, y = classification_data(n=32)
    trainer = LayerwiseSAM(
        _scaled_middle_model(), rho=0.05, num_layers=1, reselect_every=3, layers=None
    )
    trainer.compile(optimizer=keras.optimizers.SGD(0.01), loss=logits_loss(),
                    steps_per_execution=2)
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(trainer.selected_layers)
    )
    trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    # Executions of 2 steps: steps 1-2, then 3-4 (due after step 3), re-chosen after it.
    assert seen == [["last"], ["scaled"]]
    assert int(keras.ops.convert_to_numpy(trainer.optimizer.iterations)) == 4


def _deep_mlp():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    h = inputs
    for i in range(4):
        h = keras.layers.Dense(6, activation="tanh", name=f"hidden_{i}")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))


def _matmuls_in_compiled_step(trainer, x, y, train_step=None):
    """Matrix products in the optimized XLA program of one train step: dots with a
    result of two or more dimensions (the norms' inner products, rows of a weight
    against themselves, give a vector or a scalar and are not counted)."""
    train_step = train_step or trainer.train_step
    if keras.backend.backend() == "jax":
        import jax

        state = (
            [v.value for v in trainer.trainable_variables],
            [v.value for v in trainer.non_trainable_variables],
            [v.value for v in trainer.optimizer.variables],
            [v.value for v in trainer.metrics_variables],
        )
        text = jax.jit(train_step).lower(state, (x, y)).compile().as_text()
    else:
        import tensorflow as tf

        step = tf.function(train_step, jit_compile=True)
        text = step.experimental_get_compiler_ir((x, y))(stage="optimized_hlo")
    results = re.findall(r"= \w+\[([^\]]*)\]\S* dot\(", text)
    return sum("," in shape for shape in results)


@compiled_step_only
def test_compiled_step_truncates_the_ascent_and_reuses_activations():
    """Head chosen: the clean backward stops at the head, and the perturbed pass reuses
    the clean activations below it. An MLP of 5 Dense layers: SGD computes 5 products
    forward and 9 backward (5 kernel + 4 input gradients), SAM twice that; with the head
    alone perturbed, SGD's 14 + 1 (the head's ascent gradient) + 1 (its perturbed forward)."""
    x, y = classification_data(n=16, n_in=6, n_classes=2)
    trainer = LayerwiseSAM(
        _deep_mlp(), rho=0.1, num_layers=1, reselect_every=NEVER, layers=None
    )
    sam = keras_sam.SAM(_deep_mlp())
    sgd = keras_sam.models.ModelWrapper(_deep_mlp())
    for model in (trainer, sam, sgd):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=logits_loss())
        model.optimizer.build(model.trainable_variables)
    assert _matmuls_in_compiled_step(sgd, x, y) == 14
    assert _matmuls_in_compiled_step(sam, x, y) == 28
    assert trainer.selected_layers == ["head"]
    selection = keras.ops.convert_to_numpy(trainer._selection.value)
    cut = trainer._cut_below(selection)
    assert cut == 4
    assert _matmuls_in_compiled_step(trainer, x, y, trainer.train_step_for(cut)) == 14 + 2
    assert trainer.step_variant is None  # set only while a step runs


# ---------------------------------------------------------------- state and saving
def test_batchnorm_statistics_updated_once_at_clean_weights():
    x, y = classification_data(n=16)
    reference = bn_dropout_model()
    reference(x, training=True)
    trainer = LayerwiseSAM(bn_dropout_model(), rho=1.0, num_layers=1.0, layers=None)
    trainer.compile(optimizer=keras.optimizers.SGD(0.0), loss=logits_loss())
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    bn = trainer.model.get_layer("bn")
    expected = reference.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean, expected.moving_mean, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance, expected.moving_variance, atol=1e-6)


def test_config_round_trip():
    trainer = LayerwiseSAM(
        bn_dropout_model(), rho=0.07, num_layers=2, reselect_every=5,
        layers=lambda layer: layer.name != "bn", radius="per_layer", ranking_decay=0.5,
        max_cuts=2, name="lw",
    )
    config = trainer.get_config()
    assert config["layers"] == ["dense_in", "dense_out"]
    clone = LayerwiseSAM.from_config(config)
    for key in ("num_layers", "reselect_every", "radius", "ranking_decay", "max_cuts", "rho"):
        assert getattr(clone, key) == getattr(trainer, key), key
    assert clone.candidate_layers == trainer.candidate_layers
    assert clone.name == "lw"
    for layers, candidates in ((0.5, ["bn", "dense_out"]), (None, ["dense_in", "bn", "dense_out"])):
        config = LayerwiseSAM(bn_dropout_model(), layers=layers).get_config()
        assert config["layers"] == layers
        assert LayerwiseSAM.from_config(config).candidate_layers == candidates


def _bn_model():
    """BatchNorm without Dropout: Keras 3.15 does not save a SeedGenerator's state in
    `.keras` files, so no model with Dropout resumes bit-for-bit (plain Keras neither)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8,))
    h = keras.layers.Dense(16, name="dense_in")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dense(8, activation="relu", name="dense_mid")(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="dense_out")(h))


def test_save_load_resumes_identically(tmp_path):
    x, y = classification_data(n=32)

    def make():
        trainer = LayerwiseSAM(_bn_model(), rho=0.1, num_layers=1, reselect_every=2)
        trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss=logits_loss())
        return trainer

    uninterrupted = make()
    uninterrupted.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)

    first = make()
    first.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "lw.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, LayerwiseSAM)
    np.testing.assert_array_equal(loaded._selection.numpy(), first._selection.numpy())
    np.testing.assert_array_equal(loaded._grad_norms.numpy(), first._grad_norms.numpy())
    loaded.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert_weights_close(loaded.model.get_weights(), uninterrupted.model.get_weights(), atol=1e-6)
    assert loaded.selected_layers == uninterrupted.selected_layers


# ---------------------------------------------------------------- arguments
def test_candidates_from_objects_names_and_nested_models():
    inner = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(4, name="b")],
        name="block",
    )
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2, name="head")(inner(inputs))
    model = keras.Model(inputs, outputs)
    assert LayerwiseSAM(model, layers=None).candidate_layers == ["a", "b", "head"]
    assert LayerwiseSAM(model).candidate_layers == ["head"]  # output-side quarter, rounded up
    paths = [v.path for v in LayerwiseSAM(model).trainable_variables]
    assert paths == [v.path for v in model.trainable_variables]  # in the model's order
    assert LayerwiseSAM(model, layers=0.5).candidate_layers == ["b", "head"]
    trainer = LayerwiseSAM(model, layers=["head", inner])  # a whole block is one layer
    assert trainer.candidate_layers == ["block", "head"]
    assert LayerwiseSAM(model, layers=None, num_layers=0.25).num_chosen_layers == 1  # rounds up
    assert LayerwiseSAM(model, layers=None, num_layers=10).num_chosen == 3  # the old spelling


def _two_layer_model():
    return plain_model()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"num_layers": -1}, ValueError, "num_layers"),
    ({"num_layers": 1.5}, ValueError, "num_layers"),
    ({"num_layers": float("nan")}, ValueError, "num_layers"),
    ({"num_layers": "2"}, TypeError, "num_layers"),
    ({"num_layers": True}, TypeError, "num_layers"),
    ({"reselect_every": 0}, ValueError, "reselect_every"),
    ({"reselect_every": 1.0}, TypeError, "reselect_every"),
    ({"max_cuts": 0}, ValueError, "max_cuts"),
    ({"radius": "layer"}, ValueError, "radius"),
    ({"ranking_decay": 1.0}, ValueError, "ranking_decay"),
    ({"ranking_decay": "0.9"}, TypeError, "ranking_decay"),
    ({"layers": ["nope"]}, ValueError, "layers"),
    ({"layers": [keras.layers.Dense(2)]}, ValueError, "layers"),
    ({"layers": [3]}, TypeError, "layers"),
    ({"layers": "dense"}, TypeError, "layers"),
    ({"layers": 0.0}, ValueError, "layers"),
    ({"layers": 1.5}, ValueError, "layers"),
    ({"layers": float("nan")}, ValueError, "layers"),
    ({"layers": 1}, TypeError, "layers"),
    ({"layers": True}, TypeError, "layers"),
    ({"layers": lambda layer: False}, ValueError, "layers"),
    ({"rho": -0.1}, ValueError, "rho"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        LayerwiseSAM(_two_layer_model(), **kwargs)


def test_layers_without_weights_or_overlapping_are_rejected():
    model = bn_dropout_model()
    with pytest.raises(ValueError, match="no trainable variables"):
        LayerwiseSAM(model, layers=[model.layers[3]])  # ReLU
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="a")], name="blk")
    outer = keras.Sequential([keras.Input((4,)), inner])
    with pytest.raises(ValueError, match="overlap"):
        LayerwiseSAM(outer, layers=["blk", "a"])


def test_an_unbuilt_model_gets_its_candidates_when_it_is_built():
    """Accepted at construction (`fit` builds it from the first batch); what needs the
    layers before that says how to build them."""
    model = keras.Sequential([keras.layers.Dense(2, name="only")])
    trainer = LayerwiseSAM(model, layers=None)
    with pytest.raises(ValueError, match=r"call the model once on a batch"):
        trainer.candidate_layers  # noqa: B018
    model(np.zeros((1, 3), "float32"))
    assert trainer.candidate_layers == ["only"]
    assert trainer.num_chosen_layers == 1


def test_a_subclassed_model_built_without_variables_is_accepted_and_explained():
    """`build(input_shape)` on a subclassed model without its own `build` marks it
    built but creates no variable; the error says what does."""

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    model = Subclassed()
    model.build((None, 3))
    trainer = LayerwiseSAM(model, layers=None)
    with pytest.raises(ValueError, match=r"model\(x\[:1\]\)"):
        trainer.num_chosen_layers  # noqa: B018
    model(np.zeros((1, 3), "float32"))
    assert trainer.candidate_layers == ["dense"]


def test_mixed_precision_ranks_unscaled_norms():
    keras.config.set_dtype_policy("mixed_float16")
    x, y = classification_data(n=32)
    trainer = LayerwiseSAM(plain_model(), rho=0.1, num_layers=1, ranking_decay=0.0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=logits_loss())
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    trainer.fit(x, y, batch_size=32, epochs=2, verbose=0)
    norms = list(trainer.layer_grad_norms.values())
    assert all(np.isfinite(w).all() for w in trainer.model.get_weights())
    assert all(0.0 < n < 10.0 for n in norms)  # unscaled (the loss scale is 2**15)
