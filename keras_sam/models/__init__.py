"""Train-step wrappers: a shared skeleton and one file per method."""

from keras_sam.models.asam import ASAM
from keras_sam.models.base import SharpnessAwareTrainer
from keras_sam.models.ksam import KSAM
from keras_sam.models.layerwise import LayerwiseSAM
from keras_sam.models.sam import SAM
from keras_sam.models.wrapper import ModelWrapper

__all__ = ["ASAM", "KSAM", "SAM", "LayerwiseSAM", "ModelWrapper", "SharpnessAwareTrainer"]
