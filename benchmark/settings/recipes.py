"""Named training recipes. Every method of a comparison runs through the same recipe; every field can be
overridden from the command line (``--set lr=3e-4 epochs=4``).

- ``paper``: the CrossFusion paper's shared hyper-parameters (Adam lr 1e-4, weight decay 4e-6, batch 1 with
  32-step gradient accumulation, alpha 0.2, a 5-epoch linear warm-up then cosine decay). The official code
  trains up to 100 epochs with early stopping *on the reported fold* and calls its 5 "warm-up" epochs a
  no-save period; the paper states neither a fixed budget nor a schedule, so this
  recipe fixes 20 epochs (the Mahmood budget) with a real LR warm-up, which makes ``last`` meaningful.
- ``mahmood``: the MCAT / Patch-GCN defaults (Adam lr 2e-4, weight decay 1e-5, 20 epochs, alpha 0,
  constant LR, last epoch), without their gradient leak across epochs.
- ``demo``: **a demo recipe, not a result recipe.** Sized for the embedded synthetic cohorts so that the Table 1
  grid (11 methods x 6 cohorts x 5 folds) runs on 2 CPU cores in about 7 minutes for the six light methods
  and 77 minutes for all (docs/CORE.md, "Grid cost"): few epochs, a cap on the bags drawn per epoch
  and small accumulation windows, at the Mahmood learning rate. Measured on demo
  BLCA (fold 0 for CrossFusion, 5 folds for AMIL): lr 5e-4 left CrossFusion at chance (0.475) and gave AMIL
  0.597; 2e-4 gives CrossFusion 0.587, AMIL 0.630, DSMIL 0.613 (3 folds); 1e-4 gives CrossFusion 0.651 but
  DSMIL 0.528 (3 folds), under-trained in 384 draws.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from benchmark.naming import did_you_mean


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings of a run (the same for every method of a comparison).

    Attributes
    ----------
    name : str
        Recipe name (recorded in every result).
    lr, weight_decay : float
        Adam learning rate and coupled L2 weight decay (``torch.optim.Adam(weight_decay=...)``, as the
        official codes; not AdamW).
    epochs : int
        Training epochs (each draws ``samples_per_epoch`` bags).
    accumulation : int
        Bags per optimiser step (batch 1 with gradient accumulation). Every epoch ends with a step on its
        last, possibly shorter, window, so no gradient leaks into the next epoch.
    alpha : float
        Weight of the uncensored NLL term.
    warmup_epochs : float
        Linear LR warm-up length, in epochs (0 = none).
    schedule : str
        ``"cosine"`` (cosine decay to 0 after the warm-up, stepped per optimiser step) or ``"constant"``.
    max_samples_per_epoch : int or None
        Cap on the bags drawn per epoch (None = one draw per training sample, the official behaviour).
    balanced_sampler : bool
        Draw bags with replacement, weighted so each (bin x censorship) class is equally likely (Mahmood /
        CrossFusion default); False = a seeded shuffle of the training fold.
    inner_fraction : float
        Share of the training fold held out as the inner validation split (selection ``inner`` only).
    patience : int or None
        Selection ``inner``: stop after this many epochs without an inner C-index improvement (None = run
        every epoch, keep the best).
    """

    name: str
    lr: float = 1e-4
    weight_decay: float = 4e-6
    epochs: int = 20
    accumulation: int = 32
    alpha: float = 0.2
    warmup_epochs: float = 5.0
    schedule: str = "cosine"
    max_samples_per_epoch: int | None = None
    balanced_sampler: bool = True
    inner_fraction: float = 0.2
    patience: int | None = None

    def __post_init__(self) -> None:
        problems = [p for p in (_problem(self, f.name) for f in fields(self) if f.name != "name") if p]
        if self.warmup_epochs > 0 and self.warmup_epochs >= self.epochs:
            problems.append(f"warmup_epochs={self.warmup_epochs} is not shorter than epochs={self.epochs} (the "
                            "learning rate would never reach its peak and never decay)")
        if problems:
            raise ValueError(f"recipe {self.name!r}: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Accepted range of each numeric field: (lowest, highest, whether the lowest value itself is allowed).
FIELD_RANGES: dict[str, tuple[float, float, bool]] = {
    "lr": (0.0, math.inf, False),
    "weight_decay": (0.0, math.inf, True),
    "epochs": (1, math.inf, True),
    "accumulation": (1, math.inf, True),
    "alpha": (0.0, 1.0, True),
    "warmup_epochs": (0.0, math.inf, True),
    "max_samples_per_epoch": (1, math.inf, True),
    "inner_fraction": (0.0, 1.0, False),
    "patience": (1, math.inf, True),
}
SCHEDULES = ("cosine", "constant")


def _problem(recipe: "Recipe", name: str) -> str | None:
    """Why field ``name`` of ``recipe`` is invalid (None when it is fine): non-finite numbers, values out of
    range, an unknown schedule, a wrong type."""
    value = getattr(recipe, name)
    if name == "schedule":
        return None if value in SCHEDULES else f"schedule must be one of {', '.join(SCHEDULES)}, got {value!r}"
    if name == "balanced_sampler":
        return None if isinstance(value, bool) else f"balanced_sampler must be true or false, got {value!r}"
    if value is None and name in ("max_samples_per_epoch", "patience"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {value!r}"
    if not math.isfinite(value):
        return f"{name} must be a finite number, got {value}"
    low, high, low_ok = FIELD_RANGES[name]
    if value < low or (value == low and not low_ok) or value > high or (name == "inner_fraction" and value >= high):
        bounds = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if name == "inner_fraction" else
                                                        f" and <= {high}" if math.isfinite(high) else "")
        return f"{name} must be {bounds}, got {value}"
    return None


RECIPES: dict[str, Recipe] = {
    "paper": Recipe("paper", lr=1e-4, weight_decay=4e-6, epochs=20, accumulation=32, alpha=0.2, warmup_epochs=5,
                    schedule="cosine"),
    "mahmood": Recipe("mahmood", lr=2e-4, weight_decay=1e-5, epochs=20, accumulation=32, alpha=0.0, warmup_epochs=0,
                      schedule="constant"),
    "demo": Recipe("demo", lr=2e-4, weight_decay=1e-5, epochs=4, accumulation=8, alpha=0.2, warmup_epochs=0.5,
                   schedule="cosine", max_samples_per_epoch=96),
}



def register_recipe(recipe: Recipe) -> Recipe:
    """Add a named recipe (a lab's own, or a test's); a run then refers to it by name like the built-in ones."""
    RECIPES[recipe.name.lower()] = recipe
    return recipe




def _parse_value(field_name: str, raw: Any, current: Any, annotation: str) -> Any:
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if text.lower() in ("none", "null") and "None" in annotation:
        return None
    try:
        if "bool" in annotation:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "int" in annotation and "float" not in annotation:
            return int(float(text)) if float(text).is_integer() else int(text)
        if "float" in annotation:
            return float(text)
        return text
    except ValueError:
        raise ValueError(f"--set {field_name}={raw}: cannot parse the value as {annotation}") from None


def get_recipe(name: str, overrides: Mapping[str, Any] | None = None, notes: list[str] | None = None) -> Recipe:
    """A named recipe with ``overrides`` applied (string values are parsed to the field's type).

    A run made shorter than the recipe's warm-up (``--set epochs=1`` on ``paper``, whose warm-up is 5 epochs)
    keeps the recipe's warm-up *fraction* instead; the change is appended to ``notes``. A warm-up given
    explicitly and not shorter than the run is refused.

    Raises
    ------
    KeyError
        Unknown recipe name (with a "did you mean" hint).
    ValueError
        Unknown field, unparsable, non-finite or out-of-range value.
    """
    try:
        base = RECIPES[name.lower()]
    except KeyError:
        raise did_you_mean(name, list(RECIPES), "recipe") from None
    if not overrides:
        return base
    known = {f.name: f for f in fields(Recipe)}
    changes = {}
    for key, raw in overrides.items():
        if key == "name" or key not in known:
            raise ValueError(f"--set {key}: unknown recipe field; known fields: "
                             f"{', '.join(k for k in known if k != 'name')}")
        changes[key] = _parse_value(key, raw, getattr(base, key), str(known[key].type))
    epochs = changes.get("epochs", base.epochs)
    if "warmup_epochs" not in changes and isinstance(epochs, int) and 0 < epochs <= base.warmup_epochs:
        changes["warmup_epochs"] = round(base.warmup_epochs / base.epochs * epochs, 6)
        if notes is not None:
            notes.append(f"recipe {base.name}: warm-up {base.warmup_epochs:g} epochs is not shorter than the "
                         f"{epochs}-epoch run; using {changes['warmup_epochs']:g} (the recipe's fraction "
                         f"{base.warmup_epochs / base.epochs:.0%} of the epochs)")
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as exc:
        raise ValueError(f"--set {' '.join(f'{k}={v}' for k, v in overrides.items())}: {exc}") from None
