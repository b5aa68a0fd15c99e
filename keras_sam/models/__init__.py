"""Train-step wrappers: a shared skeleton and one file per method."""

from keras_sam.models.asam import ASAM
from keras_sam.models.esam import ESAM
from keras_sam.models.friendly_sam import FriendlySAM
from keras_sam.models.gsam import GSAM
from keras_sam.models.ksam import KSAM
from keras_sam.models.layerwise import LayerwiseSAM
from keras_sam.models.looksam import LookSAM
from keras_sam.models.sam import SAM
from keras_sam.models.trainer import SharpnessAwareTrainer
from keras_sam.models.wrapper import ModelWrapper
from keras_sam.models.wsam import WSAM

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
    "ModelWrapper",
    "SharpnessAwareTrainer",
]
