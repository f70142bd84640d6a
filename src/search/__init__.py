"""The Optuna study over the recipe: space, objective, pruning, storages, study identity, warm start,
outputs and display. The only package that imports Optuna."""
