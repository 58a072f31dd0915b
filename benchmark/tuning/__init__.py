"""Nested, equal-budget hyper-parameter tuning with Optuna."""
