"""The result store: atomic records, cell locks, and the one read-only layer over them."""
