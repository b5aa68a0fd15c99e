"""keras_sam: Sharpness-Aware Minimization for Keras 3.

Train-step wrappers (`model.fit` works unchanged): `SAM`, `ASAM`, `KSAM`,
`LayerwiseSAM`, and the variants `GSAM`, `LookSAM`, `ESAM`, `FriendlySAM`,
`WSAM`. Optimizers with one gradient per step (Momentum-SAM):
`keras_sam.optimizers.MSAM` and `keras_sam.optimizers.AdamWMSAM`, with
`keras_sam.callbacks.MSAMCallback` for evaluation and checkpoints during `fit`.
`keras_sam.sharpness` measures what SAM optimizes (Hessian spectrum, m-sharpness,
loss landscapes); `keras_sam.callbacks.SharpnessMonitor` logs it during `fit`.
"""

from keras_sam import callbacks, optimizers, rho, sharpness
from keras_sam.models import (
    ASAM,
    ESAM,
    GSAM,
    KSAM,
    SAM,
    WSAM,
    FriendlySAM,
    LayerwiseSAM,
    LookSAM,
    SharpnessAwareTrainer,
)

__version__ = "0.1.0"

__all__ = [
    "ASAM",
    "ESAM",
    "GSAM",
    "KSAM",
    "SAM",
    "WSAM",
    "FriendlySAM",
    "LayerwiseSAM",
    "LookSAM",
    "SharpnessAwareTrainer",
    "__version__",
    "callbacks",
    "optimizers",
    "rho",
    "sharpness",
]
