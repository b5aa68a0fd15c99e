"""The variant zoo (GSAM, LookSAM, ESAM, Friendly-SAM, WSAM) and the options every
wrapper takes (``perturb``, ``num_batch_splits``), against `zoo_reference`: ten
full-batch SGD steps, max abs weight error <= 1e-5."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import keras_sam
from tests import numpy_reference as ref
from tests.helpers import assert_weights_close, bn_dropout_model, keras_mlp
from tests.models import zoo_reference as zoo

RNG = np.random.default_rng(7)
X = RNG.normal(size=(8, 3)).astype("float32")
Y = RNG.normal(size=(8, 2)).astype("float32")
STEPS = 10
LR = 0.1
ATOL = 1e-5


def _fit(wrapper, params, optimizer=None, jit_compile=False, steps=STEPS, **kwargs):
    trainer = wrapper(keras_mlp(params), **kwargs)
    trainer.compile(optimizer=optimizer or keras.optimizers.SGD(LR), loss="mse",
                    jit_compile=jit_compile)
    trainer.fit(X, Y, batch_size=len(X), epochs=steps, shuffle=False, verbose=0)
    return trainer


def _weights(trainer):
    return trainer.model.get_weights()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_gsam_matches_reference(jit_compile):
    params = ref.init_params(seed=2)
    want = zoo.gsam(params, X, Y, LR, rho=0.3, alpha=0.4, steps=STEPS)
    got = _fit(keras_sam.GSAM, params, jit_compile=jit_compile, rho=0.3, alpha=0.4)
    assert_weights_close(_weights(got), want, atol=ATOL)


def test_gsam_alpha_zero_is_sam():
    params = ref.init_params(seed=2)
    want = zoo.gsam(params, X, Y, LR, rho=0.3, alpha=0.0, steps=STEPS)
    sam = _fit(keras_sam.SAM, params, rho=0.3)
    assert_weights_close(_weights(sam), want, atol=ATOL)


def test_gsam_rho_follows_the_learning_rate():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.8)
    lr = lambda t: 0.2 * 0.8**t  # noqa: E731
    rho = keras_sam.rho.ProportionalToLearningRate(rho_max=0.5, rho_min=0.1, lr_max=0.2,
                                                   lr_min=0.02)
    rho_of_lr = lambda lr_t: 0.1 + 0.4 * (lr_t - 0.02) / 0.18  # noqa: E731
    params = ref.init_params(seed=3)
    want = zoo.gsam(params, X, Y, lr, rho=None, alpha=0.2, steps=STEPS, rho_of_lr=rho_of_lr)
    got = _fit(keras_sam.GSAM, params, keras.optimizers.SGD(schedule), rho=rho, alpha=0.2)
    assert_weights_close(_weights(got), want, atol=ATOL)
    restored = keras_sam.GSAM.from_config(got.get_config())
    assert restored.rho.get_config() == rho.get_config()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_looksam_matches_reference(jit_compile):
    params = ref.init_params(seed=4)
    want = zoo.looksam(params, X, Y, LR, rho=0.3, alpha=0.7, k=3, steps=STEPS)
    got = _fit(keras_sam.LookSAM, params, jit_compile=jit_compile, rho=0.3, alpha=0.7, k=3)
    assert_weights_close(_weights(got), want, atol=ATOL)


def test_looksam_k_one_is_sam():
    params = ref.init_params(seed=4)
    sam = _fit(keras_sam.SAM, params, rho=0.3)
    looksam = _fit(keras_sam.LookSAM, params, rho=0.3, alpha=0.7, k=1)
    assert_weights_close(_weights(looksam), _weights(sam), atol=1e-6)


def test_looksam_parallel_gradients_store_no_nan():
    """ε = 0 (ρ = 0) gives g_s = g, g_v = 0: the stored direction is 0, not NaN."""
    params = ref.init_params(seed=4)
    trainer = _fit(keras_sam.LookSAM, params, rho=0.0, k=2, steps=3)
    for direction in trainer._directions:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(direction.value), 0.0)
    base = _fit(keras_sam.SAM, params, rho=0.0, steps=3)
    assert_weights_close(_weights(trainer), _weights(base), atol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_esam_matches_reference(jit_compile):
    params = ref.init_params(seed=5)
    want = zoo.esam(params, X, Y, LR, rho=0.5, gamma=0.5, steps=STEPS)
    got = _fit(keras_sam.ESAM, params, jit_compile=jit_compile, rho=0.5, beta=1.0, gamma=0.5)
    assert_weights_close(_weights(got), want, atol=ATOL)


def test_esam_gamma_one_beta_one_is_sam():
    params = ref.init_params(seed=5)
    sam = _fit(keras_sam.SAM, params, rho=0.3)
    esam = _fit(keras_sam.ESAM, params, rho=0.3, beta=1.0, gamma=1.0)
    assert_weights_close(_weights(esam), _weights(sam), atol=1e-6)


def test_esam_weight_perturbation_keeps_whole_variables_with_probability_beta():
    """SWP: each ε is 0 or ρ g/(β‖g_K‖) over the kept set K; K is kept with rate β,
    and the draw is a function of (seed, step): the same again, another next step."""
    model = bn_dropout_model(dropout=0.0)
    trainer = keras_sam.ESAM(model, rho=0.2, beta=0.5, seed=11)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trainer.optimizer.build(trainer.trainable_variables)
    variables = trainer.trainable_variables
    rng = np.random.default_rng(0)
    grads = [keras.ops.convert_to_tensor(rng.normal(size=v.shape).astype("float32"))
             for v in variables]
    kept_counts = []
    draws = []
    for step in range(40):
        trainer.optimizer.iterations.assign(step)
        eps = [keras.ops.convert_to_numpy(e) for e in trainer.perturbation(grads, variables)]
        kept = [bool(np.any(e != 0)) for e in eps]
        norm = ref.global_norm([keras.ops.convert_to_numpy(g) for g, k in zip(grads, kept) if k])
        for e, g, k in zip(eps, grads, kept):
            if k:
                np.testing.assert_allclose(e, 0.2 * keras.ops.convert_to_numpy(g) / norm / 0.5,
                                           rtol=1e-5)
        kept_counts.append(sum(kept))
        draws.append(tuple(kept))
    assert abs(np.mean(kept_counts) / len(variables) - 0.5) < 0.12
    trainer.optimizer.iterations.assign(3)
    again = [bool(np.any(keras.ops.convert_to_numpy(e) != 0))
             for e in trainer.perturbation(grads, variables)]
    assert tuple(again) == draws[3]
    assert len(set(draws)) > 5


@pytest.mark.parametrize("jit_compile", [False, True])
def test_friendly_sam_matches_reference(jit_compile):
    params = ref.init_params(seed=6)
    want = zoo.friendly_sam(params, X, Y, LR, rho=0.3, sigma=0.7, lmbda=0.6, steps=STEPS)
    got = _fit(keras_sam.FriendlySAM, params, jit_compile=jit_compile, rho=0.3, sigma=0.7,
               lmbda=0.6)
    assert_weights_close(_weights(got), want, atol=ATOL)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_wsam_matches_reference_with_a_learning_rate_schedule(jit_compile):
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.9)
    params = ref.init_params(seed=8)
    want = zoo.wsam(params, X, Y, lambda t: 0.2 * 0.9**t, rho=0.3, gamma=0.8, steps=STEPS)
    got = _fit(keras_sam.WSAM, params, keras.optimizers.SGD(schedule), jit_compile, rho=0.3,
               gamma=0.8)
    assert_weights_close(_weights(got), want, atol=ATOL)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_num_batch_splits_matches_reference(jit_compile):
    params = ref.init_params(seed=9)
    want = zoo.sam_splits(params, X, Y, LR, rho=0.3, splits=2, steps=STEPS)
    got = _fit(keras_sam.SAM, params, jit_compile=jit_compile, rho=0.3, num_batch_splits=2)
    assert_weights_close(_weights(got), want, atol=ATOL)
    one_part = _fit(keras_sam.SAM, params, rho=0.3)
    assert max(np.abs(a - b).max() for a, b in zip(_weights(got), _weights(one_part))) > 1e-4


def test_num_batch_splits_at_rho_zero_is_the_full_batch_gradient():
    params = ref.init_params(seed=9)
    split = _fit(keras_sam.SAM, params, rho=0.0, num_batch_splits=4)
    base = _fit(keras_sam.SAM, params, rho=0.0)
    assert_weights_close(_weights(split), _weights(base), atol=1e-6)


def test_perturb_predicate_matches_reference():
    params = ref.init_params(seed=10)
    want = zoo.sam_filtered(params, X, Y, LR, rho=0.3, perturbed=[True, False, True, False],
                            steps=STEPS)
    got = _fit(keras_sam.SAM, params, rho=0.3, perturb=lambda v: v.name == "kernel")
    assert_weights_close(_weights(got), want, atol=ATOL)


def test_perturb_normalization_selects_the_normalization_scales_and_shifts():
    trainer = keras_sam.SAM(bn_dropout_model(), perturb="normalization")
    chosen = [v.path for v, keep in zip(trainer.trainable_variables,
                                        trainer.perturbed_mask(trainer.trainable_variables))
              if keep]
    assert sorted(p.split("/")[-1] for p in chosen) == ["beta", "gamma"]
    assert all("/bn/" in f"/{p}" for p in chosen)


@pytest.mark.parametrize(
    ("wrapper", "kwargs", "error", "name"),
    [
        (keras_sam.GSAM, {"alpha": -0.1}, ValueError, "alpha"),
        (keras_sam.GSAM, {"alpha": "big"}, TypeError, "alpha"),
        (keras_sam.LookSAM, {"k": 0}, ValueError, "k"),
        (keras_sam.LookSAM, {"k": 2.5}, TypeError, "k"),
        (keras_sam.LookSAM, {"alpha": float("nan")}, ValueError, "alpha"),
        (keras_sam.ESAM, {"beta": 0.0}, ValueError, "beta"),
        (keras_sam.ESAM, {"gamma": 1.5}, ValueError, "gamma"),
        (keras_sam.ESAM, {"seed": -1}, ValueError, "seed"),
        (keras_sam.FriendlySAM, {"lmbda": 1.0}, ValueError, "lmbda"),
        (keras_sam.FriendlySAM, {"sigma": -1.0}, ValueError, "sigma"),
        (keras_sam.WSAM, {"gamma": 1.0}, ValueError, "gamma"),
        (keras_sam.SAM, {"perturb": "weights"}, ValueError, "perturb"),
        (keras_sam.SAM, {"perturb": 3}, TypeError, "perturb"),
        (keras_sam.SAM, {"num_batch_splits": 0}, ValueError, "num_batch_splits"),
        (keras_sam.SAM, {"num_batch_splits": 2.0}, TypeError, "num_batch_splits"),
    ],
)
def test_bad_arguments_raise_naming_them(wrapper, kwargs, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        wrapper(keras_mlp(ref.init_params()), **kwargs)


def test_hyperparameters_are_keyword_only():
    with pytest.raises(TypeError):
        keras_sam.SAM(keras_mlp(ref.init_params()), 0.05)


@pytest.mark.parametrize(
    "kwargs",
    [{"rho_max": -1.0, "rho_min": 0.0, "lr_max": 1.0, "lr_min": 0.0},
     {"rho_max": 1.0, "rho_min": 0.0, "lr_max": 1.0, "lr_min": 1.0}],
)
def test_proportional_rho_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=r"rho_max|lr_max"):
        keras_sam.rho.ProportionalToLearningRate(**kwargs)


@pytest.mark.tf_only
def test_num_batch_splits_under_mirrored_strategy_keeps_replicas_identical():
    from tests.helpers import classification_data, logits_loss, mirrored_strategy, plain_model

    x, y = classification_data(n=32)
    with mirrored_strategy().scope():
        trainer = keras_sam.SAM(plain_model(), rho=0.3, num_batch_splits=2)
        trainer.compile(optimizer=keras.optimizers.SGD(0.05), loss=logits_loss())
    history = trainer.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    for variable in trainer.model.trainable_variables:
        copies = [c.numpy() for c in variable.value.values]
        np.testing.assert_array_equal(copies[0], copies[1])


def test_num_batch_splits_and_perturb_survive_save_and_load(tmp_path):
    trainer = keras_sam.ASAM(keras_mlp(ref.init_params()), rho=0.3, num_batch_splits=2,
                             perturb="normalization")
    trainer.compile(optimizer=keras.optimizers.SGD(LR), loss="mse")
    trainer.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "t.keras")
    trainer.save(path)
    restored = keras.models.load_model(path)
    assert restored.num_batch_splits == 2 and restored.perturb == "normalization"
    assert_weights_close(_weights(restored), _weights(trainer), atol=0.0)


def test_num_batch_splits_updates_batchnorm_once_per_part():
    """Each part is one training-mode pass: two BatchNorm updates, each with its
    part's statistics, as two replicas would compute them."""
    from tests.helpers import classification_data, logits_loss

    x, y = classification_data(n=16)
    reference = bn_dropout_model(dropout=0.0)
    reference(x[:8], training=True)
    reference(x[8:], training=True)
    trainer = keras_sam.SAM(bn_dropout_model(dropout=0.0), rho=0.3, num_batch_splits=2)
    trainer.compile(optimizer=keras.optimizers.SGD(0.05), loss=logits_loss())
    trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for name in ("moving_mean", "moving_variance"):
        got = getattr(trainer.model.get_layer("bn"), name).numpy()
        want = getattr(reference.get_layer("bn"), name).numpy()
        np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("positional", [(0.1, 0.3), (1e-3, 0.3)])
def test_optimizer_hyperparameters_are_keyword_only(positional):
    for cls in (keras_sam.optimizers.MSAM, keras_sam.optimizers.AdamWMSAM):
        with pytest.raises(TypeError):
            cls(*positional)
