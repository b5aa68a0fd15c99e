"""K-SAM: selection of the top-k samples, reduction to SAM and to the base optimizer."""

import keras
import numpy as np
import pytest

import keras_sam
from tests import numpy_reference as ref
from tests.helpers import (
    JIT_COMPILE,
    assert_weights_close,
    bn_dropout_model,
    classification_data,
    keras_mlp,
    logits_loss,
    mirrored_strategy,
)

# One input feature, a bias-free unit kernel and y = 0: sample i's loss is (w·x_i)²,
# so the ranking is known by hand.
X1 = np.array([[0.1], [3.0], [-2.0], [0.5], [5.0], [-0.2], [1.5], [-4.0]], "float32")
Y1 = np.zeros((8, 1), "float32")


def _scalar_model(w=1.0):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    model.set_weights([np.array([[w]], "float32")])
    return model


def _expected_rho0_step(chosen, w=1.0, lr=0.01):
    x = X1[list(chosen), 0].astype(float)
    grad = np.mean(2.0 * w * x**2)  # d/dw mean (w x)^2 over the chosen samples
    return w - lr * grad


@pytest.mark.parametrize(
    ("k", "chosen"),
    [(2, {4, 7}), (3, {1, 4, 7}), (0.5, {1, 2, 4, 7}), (1, {4}), (100, set(range(8)))],
)
def test_rho0_steps_on_exactly_the_top_k_samples(k, chosen):
    trainer = keras_sam.KSAM(_scalar_model(), rho=0.0, k=k)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    trainer.fit(X1, Y1, batch_size=8, epochs=1, verbose=0)
    np.testing.assert_allclose(
        trainer.model.get_weights()[0][0, 0], _expected_rho0_step(chosen), atol=1e-6
    )


def test_ranking_uses_sample_weights():
    """A zero sample weight removes the largest raw loss from the top-k."""
    weights = np.ones(8, "float32")
    weights[4] = 0.0
    trainer = keras_sam.KSAM(_scalar_model(), rho=0.0, k=2)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    trainer.fit(X1, Y1, sample_weight=weights, batch_size=8, epochs=1, verbose=0)
    # top-2 by weighted loss: samples 7 (16) and 1 (9); the step is their mean gradient.
    np.testing.assert_allclose(
        trainer.model.get_weights()[0][0, 0], _expected_rho0_step({7, 1}), atol=1e-6
    )


def test_ksam_matches_numpy_sam_on_the_top_k():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(8, 3)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    params = ref.init_params(seed=7)
    _, _, per_sample = ref.loss_and_grads(params, x, y)
    top = np.sort(np.argsort(-per_sample)[:3])
    expected = ref.sam_sgd_step(
        params, x[top], y[top], 0.1, lambda p, g: ref.sam_epsilon(g, 0.2)
    )
    trainer = keras_sam.KSAM(keras_mlp(params), rho=0.2, k=3)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    trainer.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert_weights_close(trainer.model.get_weights(), expected, atol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_whole_batch_equals_sam(jit_compile):
    """k = |B| is SAM, with BatchNorm and Dropout, including a smaller last batch."""
    x, y = classification_data(n=40)
    results = []
    for trainer in (
        keras_sam.KSAM(bn_dropout_model(), rho=0.1, k=1.0),
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


@pytest.mark.parametrize(("k", "batch", "expected"), [
    (0.25, 32, 8), (0.25, 6, 2), (0.25, 1, 1), (0.1, 4, 1), (1.0, 7, 7), (5, 3, 3), (5, 9, 5),
])
def test_number_of_chosen_samples(k, batch, expected):
    trainer = keras_sam.KSAM(_scalar_model(), k=k)
    assert int(trainer.num_samples(batch)) == expected


def test_fraction_rounds_per_actual_batch():
    """A last batch of 4 with k = 0.5 trains on 2 samples, not on round(0.5 * 8)."""
    x = X1[:4]
    trainer = keras_sam.KSAM(_scalar_model(), rho=0.0, k=0.5)
    trainer.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=JIT_COMPILE)
    trainer.fit(x, Y1[:4], batch_size=8, epochs=1, verbose=0)
    np.testing.assert_allclose(
        trainer.model.get_weights()[0][0, 0], _expected_rho0_step({1, 2}), atol=1e-6
    )


@pytest.mark.parametrize(("k", "error"), [
    (0.0, ValueError), (1.5, ValueError), (-0.1, ValueError), (0, ValueError),
    (-3, ValueError), (float("nan"), ValueError), ("10%", TypeError), (True, TypeError),
])
def test_bad_k(k, error):
    with pytest.raises(error, match="`k`"):
        keras_sam.KSAM(_scalar_model(), k=k)


def test_only_the_ranking_pass_updates_batchnorm():
    """With k < |B|, the moving statistics are those of one pass over the whole batch."""
    x, y = classification_data(n=16)
    reference = bn_dropout_model()
    reference(x, training=True)
    trainer = keras_sam.KSAM(bn_dropout_model(), rho=0.5, k=0.25)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=logits_loss())
    trainer.fit(x, y, batch_size=16, epochs=1, verbose=0)
    bn, bn_ref = trainer.model.get_layer("bn"), reference.get_layer("bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), bn_ref.moving_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(
        bn.moving_variance.numpy(), bn_ref.moving_variance.numpy(), atol=1e-6
    )


def test_default_k_trains_the_demo_batchnorm_cnn():
    """κ = 0.1 (6 of 64 samples) on the demo's BatchNorm CNN with its schedule: far
    above chance after 5 epochs, and the hidden dense layer keeps its ReLU units (the
    hardest samples' steps switched off ~90 % of them when that layer had no
    BatchNorm, and test accuracy stayed near 10 %; ``python -m benchmarks.ksam_batchnorm``)."""
    pytest.importorskip("sklearn", reason="the demo's data (the `demo` extra)")
    from keras_sam import demo

    (x_train, y_train), (x_test, y_test), num_classes = demo.load_digits(0.0, seed=0)
    model = demo.build_model(x_train.shape[1:], num_classes, seed=0)
    trainer = keras_sam.KSAM(model)
    steps_per_epoch = int(np.ceil(len(x_train) / 64))
    schedule = demo.learning_rate(demo.SGD_LR, epochs=5, steps_per_epoch=steps_per_epoch)
    trainer.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
        loss=logits_loss(),
        jit_compile=JIT_COMPILE,
    )
    trainer.fit(x_train, y_train, batch_size=64, epochs=5, verbose=0)
    assert demo.accuracy(model, x_test, y_test) > 0.9
    hidden = keras.Model(model.input, model.layers[-2].output)(x_train, training=False)
    assert np.mean(np.all(keras.ops.convert_to_numpy(hidden) <= 0, axis=0)) < 0.1


def _bn_head_model(synchronized=False):
    keras.utils.set_random_seed(5)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, use_bias=False)(inputs)
    h = keras.layers.BatchNormalization(synchronized=synchronized)(h)
    h = keras.layers.ReLU()(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(h))


def _expected_output_kernel(model, x, y, k, lr, shards, global_statistics=False):
    """SGD's step of the output kernel at ρ = 0, by hand: per shard (replica), the
    features of a training-mode pass over the whole shard (``global_statistics``: over
    the whole batch, then split), the top-k samples by loss,
    (1/k) Σ h_iᵀ (softmax(z_i) − onehot(y_i)); the replicas' gradients averaged."""
    features = keras.Model(model.input, model.layers[-2].output)
    kernel = model.get_layer("out").kernel.numpy()
    if global_statistics:
        shard_features = np.split(np.asarray(features(x, training=True), "float64"), shards)
    else:
        shard_features = [
            np.asarray(features(xs, training=True), "float64") for xs in np.split(x, shards)
        ]
    grads = []
    for h, ys in zip(shard_features, np.split(y, shards)):
        z = h @ kernel + model.get_layer("out").bias.numpy()
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        losses = -np.log(p[np.arange(len(ys)), ys])
        top = np.argsort(-losses)[:k]
        residual = p[top] - np.eye(3)[ys[top]]
        grads.append(h[top].T @ residual / k)
    return kernel - lr * np.mean(grads, axis=0)


@pytest.mark.tf_only
@pytest.mark.parametrize(
    "jit_compile, synchronized", [(False, False), (True, False), (False, True)]
)
def test_mirrored_subset_passes_normalize_with_the_ranked_samples_statistics(
    jit_compile, synchronized
):
    """Under MirroredStrategy (2 replicas, compiled or not) each replica ranks its
    shard and its k-sample pass normalizes with the whole shard's BatchNorm
    statistics, or with a synchronized BatchNorm the whole global batch's: the output
    layer's step equals the hand-computed one. Normalizing the chosen samples among
    themselves, or a synchronized layer with one shard, gives other features (and
    fails this)."""
    x, y = classification_data(n=16, n_in=6)
    expected = _expected_output_kernel(
        _bn_head_model(), x, y, k=2, lr=0.5, shards=2, global_statistics=synchronized
    )
    with mirrored_strategy().scope():
        trainer = keras_sam.KSAM(_bn_head_model(synchronized), rho=0.0, k=0.25)
        trainer.compile(optimizer=keras.optimizers.SGD(0.5), loss=logits_loss(),
                        jit_compile=jit_compile)
    trainer.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for replica in trainer.model.get_layer("out").kernel.value.values:
        np.testing.assert_allclose(replica.numpy(), expected, atol=1e-5)
