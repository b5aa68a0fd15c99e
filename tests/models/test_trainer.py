"""The skeleton's multi-variant steps: each kind of step runs as its own train function."""

from __future__ import annotations

import keras
import numpy as np

import keras_sam
from tests.helpers import JIT_COMPILE, classification_data, logits_loss, plain_model


class Alternating(keras_sam.SAM):
    """Two kinds of step, chosen alternately on the host; records the kind each
    step body sees (at tracing on TensorFlow and JAX, at every step on PyTorch)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.chosen, self.seen, self.after = [], [], []

    def step_variants(self):
        return ["even", "odd"]

    def choose_step_variant(self, read):
        variant = ["even", "odd"][self._optimizer_steps(read) % 2]
        self.chosen.append(variant)
        return variant

    def ascent(self, *args):
        self.seen.append(self.step_variant)
        return super().ascent(*args)

    def after_train_call(self, read, write, steps_before):
        self.after.append(steps_before)


def test_each_kind_of_step_runs_its_own_train_function():
    x, y = classification_data(n=32)
    trainer = Alternating(plain_model(), rho=0.05)
    trainer.compile(optimizer="sgd", loss=logits_loss(), jit_compile=JIT_COMPILE)
    trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert trainer.chosen == ["even", "odd", "even", "odd"]
    assert trainer.after == [0, 1, 2, 3]
    assert set(trainer.seen) == {"even", "odd"}  # never the default step (None)
    if keras.backend.backend() == "torch":  # eager: the body runs at every step
        assert trainer.seen == trainer.chosen
    assert trainer.step_variant is None  # outside a step
    assert "train_step" not in vars(trainer)  # nothing of the replacement is left
    assert np.isfinite(trainer.evaluate(x, y, verbose=0))
