"""keras_sam: Sharpness-Aware Minimization for Keras 3.

Train-step wrappers (`model.fit` works unchanged): `SAM`, `ASAM`, `KSAM`.
Optimizers (one gradient per step): `keras_sam.optimizers.MSAM`, `AdamWMSAM`.
"""

from keras_sam.models import ASAM, KSAM, SAM, SharpnessAwareTrainer

__version__ = "0.1.0"

__all__ = ["ASAM", "KSAM", "SAM", "SharpnessAwareTrainer", "__version__"]
