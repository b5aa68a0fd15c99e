"""keras_sam.sharpness against closed forms and independent numpy computations."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_sam
from keras_sam import sharpness
from tests import numpy_reference as ref
from tests.helpers import bn_dropout_model, keras_mlp

RNG = np.random.default_rng(0)
N, D = 64, 5
X = RNG.normal(size=(N, D)).astype("float32") * np.array([1.0, 2.0, 0.5, 3.0, 1.0], "float32")
Y = RNG.normal(size=(N, 1)).astype("float32")
A = np.hstack([X, np.ones((N, 1))]).astype("float64")  # [X 1]


def _linear(weights=None):
    inputs = keras.Input((D,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    if weights is not None:
        model.set_weights(weights)
    return model


def _hessian(sample_weight=None):
    """MSE: L = (1/n) Σ s_i (a_iᵀθ − y_i)², so H = (2/n) Aᵀ S A."""
    s = np.ones(N) if sample_weight is None else sample_weight
    return 2.0 / N * A.T @ (s[:, None] * A)


def _eigenvalues(h, k):
    return np.sort(np.linalg.eigvalsh(h))[::-1][:k]


def test_linear_regression_top_eigenvalues_are_exact():
    got = sharpness.hessian_eigenvalues(_linear(), (X, Y), "mse", k=3, seed=0)
    np.testing.assert_allclose(got, _eigenvalues(_hessian(), 3), rtol=1e-3)


def test_eigenvectors_are_returned_per_variable():
    values, vectors = sharpness.hessian_eigenvalues(
        _linear(), (X, Y), "mse", k=2, seed=0, return_eigenvectors=True
    )
    _, exact = np.linalg.eigh(_hessian())
    top = np.concatenate([v.ravel() for v in vectors[0]])
    assert [v.shape for v in vectors[0]] == [(D, 1), (1,)]
    assert abs(abs(top @ exact[:, -1]) - 1.0) < 1e-3
    assert values[0] >= values[1]


def test_linear_regression_with_sample_weights_and_batches():
    weights = RNG.uniform(0.0, 2.0, size=N).astype("float32")
    got = sharpness.hessian_eigenvalues(_linear(), (X, Y, weights), "mse", k=3, seed=1,
                                        batch_size=16)
    np.testing.assert_allclose(got, _eigenvalues(_hessian(weights), 3), rtol=1e-3)


def test_hutchinson_trace_within_ten_percent():
    trace, error = sharpness.hessian_trace(_linear(), (X, Y), "mse", samples=100, seed=0,
                                           return_std_error=True)
    exact = np.trace(_hessian())
    assert abs(trace - exact) < 0.1 * exact
    assert 0.0 < error < 0.2 * exact


def test_mlp_top_eigenvalue_matches_a_dense_finite_difference_hessian():
    """The dense Hessian of the numpy tanh MLP by central differences of its analytic
    gradient (float64), independent of keras_sam and Keras."""
    params = ref.init_params(seed=3)
    x = RNG.normal(size=(16, 3))
    y = RNG.normal(size=(16, 2))
    flat = np.concatenate([p.ravel() for p in params])
    shapes = [p.shape for p in params]

    def grad(theta):
        parts = np.split(theta, np.cumsum([np.prod(s) for s in shapes])[:-1])
        unflat = [p.reshape(s) for p, s in zip(parts, shapes)]
        return np.concatenate([g.ravel() for g in ref.loss_and_grads(unflat, x, y)[1]])

    h = 1e-5
    dense = np.stack([(grad(flat + h * e) - grad(flat - h * e)) / (2 * h)
                      for e in np.eye(flat.size)])
    dense = (dense + dense.T) / 2
    want = np.max(np.linalg.eigvalsh(dense))
    got = sharpness.hessian_eigenvalues(keras_mlp(params), (x.astype("float32"),
                                        y.astype("float32")), "mse", k=1, seed=0)
    np.testing.assert_allclose(got[0], want, rtol=1e-2)


def test_batchnorm_and_dropout_models_are_measured_in_inference_mode():
    model = bn_dropout_model(dropout=0.5)
    x = RNG.normal(size=(32, 8)).astype("float32")
    y = RNG.integers(0, 3, size=(32,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    stats = [v.numpy() for v in model.non_trainable_variables]
    first = sharpness.hessian_eigenvalues(model, (x, y), loss, k=2, seed=0)
    second = sharpness.hessian_eigenvalues(model, (x, y), loss, k=2, seed=0)
    np.testing.assert_array_equal(first, second)  # no dropout noise
    for before, v in zip(stats, model.non_trainable_variables):
        np.testing.assert_array_equal(before, v.numpy())  # no BatchNorm update
    assert first[0] > 0


def test_multi_output_losses_are_summed():
    inputs = keras.Input((D,))
    model = keras.Model(inputs, {"a": keras.layers.Dense(1, name="a")(inputs),
                                 "b": keras.layers.Dense(1, name="b")(inputs)})
    got = sharpness.hessian_eigenvalues(model, (X, {"a": Y, "b": 2 * Y}),
                                        {"a": "mse", "b": "mse"}, k=2, seed=0)
    top = _eigenvalues(_hessian(), 1)[0]  # block diagonal: each head's H is the linear one
    np.testing.assert_allclose(got, [top, top], rtol=1e-3)


def test_mixed_precision_model_is_measured_in_float32():
    keras.config.set_dtype_policy("mixed_float16")
    model = _linear()
    keras.config.set_dtype_policy("float32")
    got = sharpness.hessian_eigenvalues(model, (X, Y), "mse", k=1, seed=0)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, _eigenvalues(_hessian(), 1), rtol=1e-2)


@pytest.mark.tf_only
def test_works_inside_a_mirrored_strategy_scope():
    from tests.helpers import mirrored_strategy

    with mirrored_strategy().scope():
        model = _linear()
        got = sharpness.hessian_eigenvalues(model, (X, Y), "mse", k=1, seed=0)
    np.testing.assert_allclose(got, _eigenvalues(_hessian(), 1), rtol=1e-3)


def test_worst_case_sharpness_one_step_is_the_quadratic_closed_form():
    """For a quadratic loss, L(w + ρĝ) − L(w) = ρ‖g‖ + ρ²/2 ĝᵀHĝ."""
    model = _linear()
    theta = np.concatenate([w.ravel() for w in model.get_weights()]).astype("float64")

    def closed_form(idx):
        a, y = A[idx], Y[idx, 0].astype("float64")
        g = 2.0 / len(idx) * a.T @ (a @ theta - y)
        u = g / np.linalg.norm(g)
        return 0.1 * np.linalg.norm(g) + 0.5 * 0.01 * u @ (2.0 / len(idx) * a.T @ a) @ u

    whole = sharpness.worst_case_sharpness(model, (X, Y), "mse", rho=0.1)
    np.testing.assert_allclose(whole, closed_form(np.arange(N)), rtol=1e-4)
    chunked = sharpness.worst_case_sharpness(model, (X, Y), "mse", rho=0.1, m=16)
    want = np.mean([closed_form(np.arange(i, i + 16)) for i in range(0, N, 16)])
    np.testing.assert_allclose(chunked, want, rtol=1e-4)
    assert chunked > whole  # smaller m, sharper (each chunk ascends on its own)
    assert sharpness.worst_case_sharpness(model, (X, Y), "mse", rho=0.1, steps=5) >= whole - 1e-6


def test_adaptive_worst_case_uses_the_weight_scaled_ball():
    model = _linear()
    theta = np.concatenate([w.ravel() for w in model.get_weights()]).astype("float64")
    t = np.abs(theta)
    g = 2.0 / N * A.T @ (A @ theta - Y[:, 0])
    delta = 0.1 * t * (t * g) / np.linalg.norm(t * g)
    want = np.mean((A @ (theta + delta) - Y[:, 0]) ** 2) - np.mean((A @ theta - Y[:, 0]) ** 2)
    got = sharpness.worst_case_sharpness(model, (X, Y), "mse", rho=0.1, adaptive=True)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_average_sharpness_at_the_minimum_is_half_sigma_squared_trace():
    solution, *_ = np.linalg.lstsq(A, Y[:, 0].astype("float64"), rcond=None)
    model = _linear([solution[:D, None].astype("float32"), solution[D:].astype("float32")])
    got = sharpness.average_sharpness(model, (X, Y), "mse", sigma=0.05, samples=400, seed=0)
    np.testing.assert_allclose(got, 0.05**2 / 2 * np.trace(_hessian()), rtol=0.15)


def test_loss_landscape_random_and_line():
    model = bn_dropout_model(dropout=0.0)
    x = RNG.normal(size=(32, 8)).astype("float32")
    y = RNG.integers(0, 3, size=(32,))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    center = float(keras.ops.convert_to_numpy(loss(y, model(x, training=False))))
    one = sharpness.loss_landscape(model, (x, y), loss, points=5, seed=0)
    assert one["losses"].shape == (5,)
    np.testing.assert_allclose(one["losses"][2], center, rtol=1e-5)
    two = sharpness.loss_landscape(model, (x, y), loss, directions=2, points=3, seed=0)
    assert two["losses"].shape == (3, 3)
    np.testing.assert_allclose(two["losses"][1, 1], center, rtol=1e-5)
    other = bn_dropout_model(seed=4, dropout=0.0)
    line = sharpness.loss_landscape(model, (x, y), loss, points=5, span=1.0, target=other)
    np.testing.assert_allclose(line["alphas"], [-0.5, 0.0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(line["losses"][1], center, rtol=1e-5)
    # At α = 1 the trainable weights are the target's (BatchNorm statistics stay the model's).
    assert abs(line["losses"][3] - center) > 1e-4


def test_plot_landscape_draws_lines_and_contours():
    import matplotlib

    matplotlib.use("Agg")
    model = _linear()
    for directions in (1, 2):
        result = sharpness.loss_landscape(model, (X, Y), "mse", directions=directions, points=3)
        ax = sharpness.plot_landscape(result)
        assert ax.has_data()


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m: sharpness.hessian_eigenvalues(m, (X, Y), "mse", k=0), "k"),
        (lambda m: sharpness.hessian_eigenvalues(m, (X, Y), "mse", max_iters=0), "max_iters"),
        (lambda m: sharpness.worst_case_sharpness(m, (X, Y), "mse", rho=-0.1), "rho"),
        (lambda m: sharpness.worst_case_sharpness(m, (X, Y), "mse", rho=0.1, m=0), "m"),
        (lambda m: sharpness.average_sharpness(m, (X, Y), "mse", sigma=-1.0), "sigma"),
        (lambda m: sharpness.hessian_trace(m, (X[:0], Y[:0]), "mse"), "data"),
        (lambda m: sharpness.loss_landscape(m, (X, Y), "mse", directions=3), "directions"),
        (lambda m: sharpness.hessian_trace(m, (X, Y), None), "loss"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        call(_linear())


def test_a_model_without_trainable_variables_is_refused():
    model = _linear()
    model.trainable = False
    with pytest.raises(ValueError, match="`model`"):
        sharpness.hessian_trace(model, (X, Y), "mse")


def test_sharpness_monitor_logs_into_history_at_clean_weights():
    model = _linear()
    model.compile(optimizer=keras_sam.optimizers.MSAM(learning_rate=0.05, rho=0.3), loss="mse")
    monitor = keras_sam.callbacks.SharpnessMonitor((X, Y), measures=("hessian_top",
                                                                     "m_sharpness"))
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0,
                        callbacks=[monitor, keras_sam.callbacks.MSAMCallback()])
    assert len(history.history["hessian_top"]) == 2
    assert len(history.history["m_sharpness"]) == 2
    after = sharpness.hessian_eigenvalues(model, (X, Y), "mse", k=1, max_iters=20, seed=0)
    np.testing.assert_allclose(history.history["hessian_top"][-1], after[0], rtol=1e-6)


def test_sharpness_monitor_on_a_wrapper_every_other_epoch():
    trainer = keras_sam.SAM(_linear(), rho=0.05)
    trainer.compile(optimizer="sgd", loss="mse")
    monitor = keras_sam.callbacks.SharpnessMonitor((X, Y), every=2)
    history = trainer.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
    assert len(history.history["hessian_top"]) == 1  # epoch 2 only
    assert history.history["hessian_top"][-1] > 0


def test_sharpness_monitor_refuses_unknown_measures():
    with pytest.raises(ValueError, match="`measures`"):
        keras_sam.callbacks.SharpnessMonitor((X, Y), measures=("flatness",))
