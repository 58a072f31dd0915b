"""The method contract: everything a method imports (``from benchmark.api import ...``).

``Bag`` and ``Needs`` (the input a method receives and declares), ``SurvivalOutput`` and ``AttentionMap`` (what it
returns) and ``register_method`` (how it joins the registry). docs/ARCHITECTURE.md "Method contract".
"""
from benchmark.api.output import AttentionMap, SurvivalOutput
from benchmark.api.registry import MethodSpec, register_method
from benchmark.data.bag import Bag, Needs

__all__ = ["AttentionMap", "Bag", "MethodSpec", "Needs", "SurvivalOutput", "register_method"]
