"""Built-in methods, one module each. Every module registers itself with
:func:`benchmark.api.registry.register_method`. The harness finds this package the way it finds any
plugin: through the ``mil_benchmark.methods`` entry point declared in ``pyproject.toml``, which imports it."""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
