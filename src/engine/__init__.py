"""Training and scoring: spatial folds, fit, cross-validation, inference with TTA and smoothing,
the competition metric. Knows nothing of Optuna, DVC or stage files."""
