"""keras_sam: Sharpness-Aware Minimization for Keras 3."""
