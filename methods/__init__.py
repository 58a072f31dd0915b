"""Built-in methods, one module each. Every module registers itself with
:func:`benchmark.training.registry.register_method`; :func:`benchmark.training.registry.load_builtin_methods` imports them all."""
