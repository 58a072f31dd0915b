"""``run --shard i/n``: a deterministic partition of a grid's cells, so a job array (Slurm, or any scheduler) runs
the grid without Ray.

Shard ``i`` of ``n`` takes every ``n``-th cell of the grid sorted by cell label, starting at the ``i``-th. Sorting by
label interleaves methods and folds, so every shard gets a similar mix of cheap and expensive cells. Every shard must
be given the same grid (the same command with another ``--shard``); shards never overlap and their union is the grid.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def shard_of(items: Sequence[T], shard: tuple[int, int] | None, label=lambda item: item.cell.label()) -> list[T]:
    """The items of shard ``(i, n)`` (all of them for None), in their original order.

    Parameters
    ----------
    items : sequence
        The grid (e.g. :class:`~benchmark.settings.config.RunConfig` objects).
    shard : (int, int) or None
        Shard index and count, as :func:`benchmark.settings.options.parse_shard` returns them.
    label : callable
        The stable, unique label of an item (its cell label by default).
    """
    if shard is None:
        return list(items)
    i, n = shard
    ordered = sorted(range(len(items)), key=lambda k: label(items[k]))
    chosen = set(ordered[i::n])
    return [item for k, item in enumerate(items) if k in chosen]
