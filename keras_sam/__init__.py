"""keras_sam: Sharpness-Aware Minimization for Keras 3.

Train-step wrappers (`model.fit` works unchanged): `SAM`, `ASAM`, `KSAM`,
`LayerwiseSAM`, and the variants `GSAM`, `LookSAM`, `ESAM`, `FriendlySAM`,
`WSAM`. Optimizers with one gradient per step (Momentum-SAM):
`keras_sam.optimizers.MSAM` and `keras_sam.optimizers.AdamWMSAM`, with
`keras_sam.callbacks.MSAMCallback` for evaluation and checkpoints during `fit`.
`keras_sam.sharpness` measures what SAM optimizes (Hessian spectrum, m-sharpness,
loss landscapes); `keras_sam.callbacks.SharpnessMonitor` logs it during `fit`.
`keras_sam.registry` lists every method once; `keras_sam.get` looks one up by name.
"""

from keras_sam import callbacks, optimizers, registry, rho, sharpness
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
from keras_sam.registry import get

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
    "get",
    "optimizers",
    "registry",
    "rho",
    "sharpness",
]
