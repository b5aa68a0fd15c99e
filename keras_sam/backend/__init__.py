"""The few backend-specific pieces: computing losses and gradients.

Everything else in keras_sam is written with `keras.ops` and runs unchanged on
every backend; this package picks the implementation for the active one.
"""

import keras

_BACKEND = keras.backend.backend()

if _BACKEND == "tensorflow":
    from keras_sam.backend.tensorflow import (
        all_reduce_sum,
        apply_if_finite,
        forward_and_gradients,
        forward_and_sample_scores,
        forward_and_switched_gradients,
        loss_scale,
        num_replicas,
        snapshot,
        stateless_gradients,
    )
else:
    raise ImportError(
        f"keras_sam's train-step wrappers support the TensorFlow backend; the active Keras "
        f"backend is {_BACKEND!r}. Set KERAS_BACKEND=tensorflow before importing keras."
    )

__all__ = [
    "all_reduce_sum",
    "apply_if_finite",
    "forward_and_gradients",
    "forward_and_sample_scores",
    "forward_and_switched_gradients",
    "loss_scale",
    "num_replicas",
    "snapshot",
    "stateless_gradients",
]
