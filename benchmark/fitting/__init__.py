"""Fitting one fold: the trainer, the one survival loss, device and precision."""
