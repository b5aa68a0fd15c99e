"""The shared step of the Momentum-SAM optimizers and non-finite gradients: checked
per entry in the default step (no conditional, no update waiting for a reduction of
its gradient), skipped exactly with the conditional that `use_ema` and gradient
accumulation keep."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_sam.optimizers import MSAM, AdamWMSAM

pytestmark = pytest.mark.filterwarnings("ignore:(AdamW)?MSAM. the model variables")

FLAVOURS = {
    "msam": lambda **kw: MSAM(0.05, momentum=0.9, rho=0.3, weight_decay=0.01, **kw),
    "adamw-msam": lambda **kw: AdamWMSAM(0.01, rho=0.3, weight_decay=0.01, **kw),
}
OPTIONS = {
    "gated": {},
    "ema": {"use_ema": True},
    "accumulation": {"gradient_accumulation_steps": 2},
}


def _state(variables, optimizer):
    return [np.array(v.numpy()) for v in [*variables, *optimizer.variables]]


def _trained(flavour, option, rng):
    variables = [keras.Variable(rng.normal(size=(3, 2)).astype("float32")), keras.Variable([0.5])]
    optimizer = FLAVOURS[flavour](**OPTIONS[option])
    for _ in range(4):  # perturbed, with momentum (and an accumulated gradient)
        optimizer.apply([rng.normal(size=v.shape).astype("float32") for v in variables], variables)
    assert optimizer.is_perturbed
    return variables, optimizer


def _clean(variables, optimizer):
    with optimizer.unperturbed():
        return [np.array(v.numpy()) for v in variables]


def _slots(optimizer):
    return [np.array(v.numpy()) for v in optimizer.variables]


@pytest.mark.parametrize("option", ["ema", "accumulation"])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_with_state_written_outside_the_step_a_non_finite_step_is_skipped_bit_for_bit(
    flavour, option, bad
):
    rng = np.random.default_rng(0)
    variables, optimizer = _trained(flavour, option, rng)
    before = _state(variables, optimizer)
    grads = [rng.normal(size=v.shape).astype("float32") for v in variables]
    grads[0][1, 0] = bad
    optimizer.apply(grads, variables)
    for got, want in zip(_state(variables, optimizer), before):
        np.testing.assert_array_equal(got, want)
    # and the next finite step is taken
    optimizer.apply([np.ones(v.shape, "float32") for v in variables], variables)
    assert any(np.any(a != b) for a, b in zip(_state(variables, optimizer), before))


@pytest.mark.parametrize("flavour", list(FLAVOURS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_an_entry_with_a_non_finite_gradient_keeps_its_weight_and_slots(flavour, bad):
    """The entry keeps its clean weight and slots; every other entry steps as it
    would with any finite gradient there (the step uses no other entry)."""
    grads = [np.random.default_rng(1).normal(size=s).astype("float32") for s in [(3, 2), (1,)]]
    finite_run = _trained(flavour, "gated", np.random.default_rng(0))
    variables, optimizer = _trained(flavour, "gated", np.random.default_rng(0))
    clean, slots = _clean(variables, optimizer), _per_variable_slots(optimizer)
    steps = int(optimizer.iterations.numpy())
    finite_run[1].apply(grads, finite_run[0])
    grads[0][1, 0] = bad
    optimizer.apply(grads, variables)
    assert int(optimizer.iterations.numpy()) == steps  # the step does not count
    assert optimizer.is_perturbed
    assert all(np.all(np.isfinite(v.numpy())) for v in variables)
    after, stepped = _clean(variables, optimizer), _clean(*finite_run)
    skipped = np.zeros((3, 2), bool)
    skipped[1, 0] = True
    np.testing.assert_allclose(after[0][skipped], clean[0][skipped], rtol=0, atol=1e-6)
    np.testing.assert_allclose(after[0][~skipped], stepped[0][~skipped], rtol=0, atol=1e-6)
    np.testing.assert_allclose(after[1], stepped[1], rtol=0, atol=1e-6)
    assert np.all(np.abs(after[0][~skipped] - clean[0][~skipped]) > 1e-4)
    for (got_first, got_second), (want_first, _), (stepped_first, stepped_second) in zip(
        _per_variable_slots(optimizer), slots, _per_variable_slots(finite_run[1])
    ):
        np.testing.assert_array_equal(got_first[skipped], want_first[skipped])
        assert np.all(got_first[~skipped] != want_first[~skipped])
        # (within rounding: without XLA on TensorFlow the finite step runs in-place kernels)
        np.testing.assert_allclose(got_first[~skipped], stepped_first[~skipped], rtol=1e-5)
        np.testing.assert_allclose(got_second, stepped_second, rtol=1e-5)


def _per_variable_slots(optimizer):
    """``[(first variable's, second's)]`` for each kind of slot of the flavour."""
    kinds = [optimizer.momentums, getattr(optimizer, "velocities", None) or []]
    return [tuple(np.array(s.numpy()) for s in kind) for kind in kinds if kind]


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_nan_loss_leaves_the_slots_bit_for_bit_and_the_weights_within_rounding(flavour):
    rng = np.random.default_rng(0)
    variables, optimizer = _trained(flavour, "gated", rng)
    before, slots = _state(variables, optimizer), _slots(optimizer)
    optimizer.apply([np.full(v.shape, np.nan, "float32") for v in variables], variables)
    for got, want in zip(_slots(optimizer), slots):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(_state(variables, optimizer), before):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("jit_compile", [True, False])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_fit_skips_a_non_finite_batch(flavour, jit_compile):
    """Two batches, the second with a NaN, train as the first alone (the slots bit
    for bit, the weights re-perturbed within rounding): under XLA, and without it
    (on TensorFlow, the in-place kernels' conditional takes its other branch)."""
    x = np.random.default_rng(1).normal(size=(32, 4)).astype("float32")
    y = (x @ np.arange(8, dtype="float32").reshape(4, 2)).astype("float32")
    bad = x.copy()
    bad[20, 1] = np.nan

    def run(inputs, targets):
        keras.utils.set_random_seed(2)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer=FLAVOURS[flavour](), loss="mse", jit_compile=jit_compile)
        model.fit(inputs, targets, batch_size=16, epochs=1, shuffle=False, verbose=0)
        return _state(model.trainable_variables, model.optimizer)

    for got, want in zip(run(bad, y), run(x[:16], y[:16])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.tf_only
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize(
    ("flavour", "kernel"), [(MSAM, "ResourceApplyMomentum"), (AdamWMSAM, "ResourceApplyAdam")]
)
def test_tensorflow_without_xla_steps_with_its_in_place_kernels(flavour, kernel, jit_compile):
    """Without XLA, the keras.ops step's intermediates of every variable were alive
    at once in TensorFlow's executor (about one parameter copy above SGD, two above
    AdamW: ``python -m benchmarks.memory --xla off``): the traced step uses
    TensorFlow's in-place kernels instead, one per variable; XLA fuses the keras.ops
    step itself. Both write the reference's weights (the reference tests). The
    kernels run in a conditional's branch (the other writes a gradient that is not
    all finite entry by entry): its graph is in the step's function library."""
    import tensorflow as tf

    variables = [keras.Variable(np.ones((3, 2))), keras.Variable(np.ones((2,)))]
    optimizer = flavour(0.1, rho=0.1, weight_decay=0.01)
    optimizer.build(variables)
    step = tf.function(lambda g: optimizer.apply([g[:3], g[3, :]], variables),
                       jit_compile=jit_compile)
    graph = step.get_concrete_function(tf.TensorSpec((4, 2), "float32")).graph.as_graph_def()
    nodes = [*graph.node, *(n for f in graph.library.function for n in f.node_def)]
    assert [n.op for n in nodes].count(kernel) == (0 if jit_compile else 2)


@pytest.mark.tf_only
@pytest.mark.parametrize("flavour", [MSAM, AdamWMSAM])
def test_tensorflow_moves_the_weights_in_place_outside_a_compiled_step(flavour, monkeypatch):
    """Assigning shifted weights gave each variable a new buffer: once `fit` had
    removed the perturbation that way at its end, the next `fit`'s XLA steps grew
    the process by 99 MiB more than SGD's on the 144 MiB MLP (9 MiB in place).
    Outside a compiled step a float32 variable moves with
    ``ResourceApplyGradientDescent``, to ``w~ + s*d`` exactly; a float16 one is
    shifted in float32 and assigned."""
    import tensorflow as tf

    variables = [keras.Variable(np.ones((3, 2)), dtype="float32"),
                 keras.Variable(np.ones((2,)), dtype="float16")]
    optimizer = flavour(0.1, rho=0.1)
    optimizer.apply([np.full((3, 2), 0.5, "float32"), np.full((2,), 0.5, "float16")], variables)
    stored = [np.array(v.numpy(), "float32") for v in variables]
    direction = [np.array(d.numpy(), "float32") for d in optimizer.momentums]
    scale = np.float32(optimizer.perturbation_scale)
    calls = []
    kernel = tf.raw_ops.ResourceApplyGradientDescent
    monkeypatch.setattr(
        tf.raw_ops, "ResourceApplyGradientDescent", lambda **kw: calls.append(kw) or kernel(**kw)
    )
    assert optimizer.remove_perturbation()
    assert len(calls) == 1  # the float32 variable
    np.testing.assert_array_equal(variables[0].numpy(), stored[0] + scale * direction[0])
    np.testing.assert_allclose(
        np.array(variables[1].numpy(), "float32"), stored[1] + scale * direction[1], rtol=1e-3
    )
    assert optimizer.apply_perturbation()
    assert len(calls) == 2
    np.testing.assert_allclose(variables[0].numpy(), stored[0], rtol=0, atol=1e-7)
