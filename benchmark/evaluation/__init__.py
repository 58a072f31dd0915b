"""Evaluation metrics of one fold's out-of-fold risks (C-index, IBS, time-dependent AUC, D-calibration)."""
