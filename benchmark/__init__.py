"""MIL survival benchmark: one loss, one loader, one set of splits for every method."""

__version__ = "0.1.0"
