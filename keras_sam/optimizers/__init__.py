"""Optimizers with a built-in sharpness-aware perturbation (one gradient per step)."""

from keras_sam.optimizers.adamw_msam import AdamWMSAM
from keras_sam.optimizers.momentum_perturbation import MomentumPerturbationOptimizer
from keras_sam.optimizers.msam import MSAM

__all__ = ["MSAM", "AdamWMSAM", "MomentumPerturbationOptimizer"]
