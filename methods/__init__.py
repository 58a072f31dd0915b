"""Built-in methods, one module each. Every module registers itself with
:func:`benchmark.registry.register_method`; :func:`benchmark.registry.load_builtin_methods` imports them all."""
