"""Slides and patches: the competition layout, its checks, the simulator, stain normalization,
registration and the patch store. Knows nothing of models, training or studies."""
