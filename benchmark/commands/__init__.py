"""One module per ``python -m benchmark <command>``; each exposes ``register(subparsers)``."""
