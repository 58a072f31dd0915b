"""Unknown-name errors with "did you mean" suggestions, shared by every registry of the harness
(methods, cohorts, backbones, recipes, synthetic presets and signals)."""
from __future__ import annotations

import difflib


class UnknownNameError(KeyError):
    """An unknown registry name; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def did_you_mean(name: str, known: list[str] | tuple[str, ...], kind: str) -> UnknownNameError:
    """Build the "unknown name, did you mean ..." error for ``name`` among ``known`` names of ``kind``."""
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(sorted(known))}.")
