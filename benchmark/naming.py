"""Names shared by every layer of the harness: unknown-name errors with "did you mean" suggestions (methods,
cohorts, backbones, recipes, synthetic presets and signals), and names that become paths: registry names are
folder names of the result store (:func:`check_registry_name`), output file names are sanitised
(:func:`safe_name`) and kept under their root (:func:`path_under`)."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

_UNSAFE_CHARACTERS = re.compile(r"[^A-Za-z0-9._+-]+")
#: Registry names (cohorts, backbones, methods) become folder names of the result store.
_REGISTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


class UnknownNameError(KeyError):
    """An unknown registry name; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def suggestion(name: str, known, cutoff: float = 0.6) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the up to two names of ``known`` closest to ``name``, else ``""``."""
    close = difflib.get_close_matches(name, sorted(known), n=2, cutoff=cutoff)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def did_you_mean(name: str, known: list[str] | tuple[str, ...], kind: str) -> UnknownNameError:
    """Build the "unknown name, did you mean ..." error for ``name`` among ``known`` names of ``kind``."""
    close = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(sorted(known))}.")


def check_registry_name(name: str, kind: str, source: object) -> None:
    """Raise ValueError when a registry name could not be a folder name of the result store."""
    if not _REGISTRY_NAME.match(name) or ".." in name:
        raise ValueError(f"{source}: {kind} name {name!r} must be letters, digits and . _ + - "
                         "(it names folders of the result store)")


def safe_name(text: str) -> str:
    """``text`` as one file-name component: runs of other characters than letters, digits and ``. _ + -``
    become ``_``, and leading dots are dropped (no hidden files, no ``..``)."""
    cleaned = _UNSAFE_CHARACTERS.sub("_", str(text)).lstrip(".")
    return cleaned or "_"


def path_under(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts`` after checking that it resolves inside ``root`` (raises ValueError otherwise)."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"{Path(root).joinpath(*parts)}: resolves outside {root}")
    return path


class Registry:
    """Named entries of one kind (executors, statistical tests, ...), in registration order.

    ``get`` raises the "did you mean" error of :func:`did_you_mean`, so an unknown name is one line naming the
    option (``Registry("executor", option="--executor")``).
    """

    def __init__(self, kind: str, option: str | None = None) -> None:
        self.kind, self.option, self._entries = kind, option, {}

    def register(self, name: str, entry):
        """Add ``entry`` under ``name`` (a second entry of one name replaces the first); returns ``entry``."""
        self._entries[name] = entry
        return entry

    def get(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            error = did_you_mean(str(name), list(self._entries), self.kind)
            raise (UnknownNameError(f"{self.option}: {error}") if self.option else error) from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self):
        return self._entries.items()

    def __contains__(self, name: object) -> bool:
        return name in self._entries
