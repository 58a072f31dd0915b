"""The result store: one JSON record per cell (method x cohort x backbone x fold x seed x recipe x selection).

Layout (``docs/ARCHITECTURE.md``, "Result store contract")::

    <results>/cells/<method>/<cohort>/<backbone>/<recipe>-<selection>-s<seed>/fold<k>.json
    <results>/cells/<method>/<cohort>/<backbone>/<recipe>-<selection>-s<seed>/fold<k>.pt   (model weights)

Records are written atomically (a temporary file ``.<name>.<pid>.<random>.tmp`` in the same folder, then
``os.replace``), so a crash or a parallel reader never sees half a record; temporary files left by a process
that is gone are removed when a run starts (:meth:`ResultStore.prepare`). Reruns skip cells whose ``ok``
record and weights are readable (:meth:`ResultStore.weights_problem`); error records and cells whose record
or weights are unreadable are redone.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from benchmark import __version__
from benchmark.naming import path_under

#: Version of the record layout (2: ``label`` added, ``unit`` only in ``config``; 1 is still read).
SCHEMA = 2
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Cell:
    """Coordinates of one record in the grid."""

    method: str
    cohort: str
    backbone: str
    fold: int
    seed: int = 0
    recipe: str = "paper"
    selection: str = "last"
    repeat: int = 0

    @property
    def run_name(self) -> str:
        """``<recipe>-<selection>-s<seed>``, with ``-r<repeat>`` for repeats of repeated cross-validation."""
        return f"{self.recipe}-{self.selection}-s{self.seed}" + (f"-r{self.repeat}" if self.repeat else "")

    @property
    def run_dir(self) -> Path:
        """Path of the cell's folder relative to the store root."""
        return Path("cells", self.method, self.cohort, self.backbone, self.run_name)

    @property
    def stem(self) -> str:
        return f"fold{self.fold}"

    def label(self) -> str:
        return f"{self.method}/{self.cohort}/{self.backbone}/{self.run_name}/fold{self.fold}"

    @classmethod
    def of(cls, record: dict) -> "Cell":
        return cls(record["method"], record["cohort"], record["backbone"], int(record["fold"]), int(record["seed"]),
                   record["recipe"], record["selection"], int(record.get("repeat") or 0))


def config_hash(config: dict) -> str:
    """Short, stable hash of a configuration (canonical JSON, sorted keys)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


_PROVENANCE_CACHE: dict[str, Any] = {}


def software_provenance() -> dict[str, Any]:
    """Package versions and git commit (cached per process)."""
    if not _PROVENANCE_CACHE:
        import numpy, pandas, sklearn, sksurv, torch  # noqa: E401 (only the versions; records load without them)

        _PROVENANCE_CACHE.update(
            {
                "versions": {
                    "harness": __version__,
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "numpy": numpy.__version__,
                    "pandas": pandas.__version__,
                    "scikit-learn": sklearn.__version__,
                    "scikit-survival": sksurv.__version__,
                },
                "git_commit": _git_commit(),
            }
        )
    return dict(_PROVENANCE_CACHE)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_safe(value: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def current_umask() -> int:
    """The process umask (read from /proc on Linux, where setting it to read it would race other threads)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1], 8)
    except (OSError, ValueError, StopIteration):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # the pid in the name tells a stale temporary file (its writer is gone) from one being written now
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 files; records and weights get the mode any new file gets (0666 less the umask),
        # so the other members of a lab's group can read a shared store
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: A temporary file whose writer cannot be identified is stale after this many seconds.
STALE_TMP_SECONDS = 3600


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale_tmp(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file of an interrupted write: its writer's pid (the second-to-last dotted
    part before the random suffix) is not running, or it cannot be told and the file is over an hour old."""
    parts = path.name.split(".")
    pid = next((int(p) for p in reversed(parts[:-2]) if p.isdigit()), None)
    if pid is not None and pid != os.getpid() and not _process_alive(pid):
        return True
    try:
        age = (now or datetime.now().timestamp()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return pid is None and age > STALE_TMP_SECONDS


def clean_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Remove the stale temporary files (see :func:`is_stale_tmp`) under ``folder``; returns them."""
    removed = []
    for path in Path(folder).rglob(".*.tmp"):
        if path.is_file() and is_stale_tmp(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class ResultStore:
    """Read and write the records under ``root``.

    Parameters
    ----------
    root : path
        The store's root folder (it holds ``cells/``).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def prepare(self, option: str = "--results") -> list[Path]:
        """Make sure the store can be written (its root is, or can be made, a writable folder) and remove the
        temporary files that interrupted writes left; returns the removed files.

        Raises
        ------
        NotADirectoryError, PermissionError
            With ``option``, the folder and the problem.
        """
        root = self.root
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"{option} {root}: exists and is not a directory")
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe.{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except FileExistsError:  # a parent is a file
            raise NotADirectoryError(f"{option} {root}: a parent folder is a file") from None
        except NotADirectoryError:
            raise NotADirectoryError(f"{option} {root}: a parent folder is a file") from None
        except PermissionError:
            raise PermissionError(f"{option} {root}: permission denied (cannot write there)") from None
        except OSError as exc:
            raise OSError(f"{option} {root}: cannot write there ({exc.strerror or exc})") from None
        return clean_stale_tmp(root)

    # paths -------------------------------------------------------------------------------------------
    def record_path(self, cell: Cell) -> Path:
        return self.root / cell.run_dir / f"{cell.stem}.json"

    def weights_path(self, cell: Cell) -> Path:
        return self.root / cell.run_dir / f"{cell.stem}.pt"

    def lock_path(self, cell: Cell) -> Path:
        """The cell's lock file (``benchmark.store.lock``): present while a process computes the cell."""
        return self.root / cell.run_dir / f"{cell.stem}.lock"

    def check_writable(self) -> None:
        """Create the root and write a probe file in it; raises ValueError naming ``--results`` when it fails."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ValueError(f"--results {self.root}: the store is not writable ({exc.strerror or exc})") from None

    # writing -----------------------------------------------------------------------------------------
    def write(self, record: dict, state_dict: dict | None = None) -> Path:
        """Write ``record`` atomically (and the model weights beside it when given); returns the JSON path."""
        missing = [k for k in ("method", "cohort", "backbone", "fold", "seed", "recipe", "selection", "status")
                   if k not in record]
        if missing:
            raise ValueError(f"result record lacks field(s) {missing}")
        cell = Cell.of(record)
        path_under(self.root, str(cell.run_dir))  # names from plugins or recipes must not leave the store
        record = dict(record)
        record.setdefault("schema", SCHEMA)
        if state_dict is not None:
            import torch

            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buffer)
            _atomic_write_bytes(self.weights_path(cell), buffer.getvalue())
            record["weights"] = self.weights_path(cell).name
        else:
            record.setdefault("weights", None)
        text = json.dumps(_json_safe(record), indent=1, allow_nan=False)
        path = self.record_path(cell)
        _atomic_write_bytes(path, text.encode())
        return path

    # reading -----------------------------------------------------------------------------------------
    def read(self, cell: Cell) -> dict | None:
        """The record of ``cell``, or None when absent."""
        path = self.record_path(cell)
        if not path.exists():
            return None
        return self._load(path)

    def _load(self, path: Path) -> dict:
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: unreadable result record ({exc})") from None
        record["_path"] = str(path)
        return record

    def has(self, cell: Cell, include_errors: bool = False) -> bool:
        """Whether ``cell`` is finished: an ``ok`` record exists (or any record, with ``include_errors``)."""
        path = self.record_path(cell)
        if not path.exists():
            return False
        if include_errors:
            return True
        try:
            return self._load(path).get("status") == "ok"
        except ValueError:
            return False

    def move(self, record: dict, to: Cell, **changes: Any) -> dict:
        """File a finished record (and its weights) under another cell's folder, e.g. when the folder naming of
        a configuration changed; the record is written first, then the old files go. Returns the new record."""
        old_cell = Cell.of(record)
        moved = {k: v for k, v in record.items() if k != "_path"}
        moved.update(recipe=to.recipe, **changes)
        old_weights = self.weights_path(old_cell)
        import torch

        state = torch.load(old_weights, weights_only=True) if record.get("weights") and old_weights.exists() else None
        self.write(moved, state_dict=state)
        for path in (old_weights, self.record_path(old_cell)):
            path.unlink(missing_ok=True)
        return self.read(to)

    def weights_problem(self, record: dict) -> str | None:
        """Why the weights a record names cannot be loaded (None when they can, or when none were saved)."""
        if not record.get("weights"):
            return None
        path = self.weights_path(Cell.of(record))
        if not path.is_file():
            return f"{path}: weights file missing"
        import torch

        try:  # mmap: checks the archive and its tensors without reading them all
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # any failure to load means the cell must be redone
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"{path}: unreadable weights ({reason})"
        if not isinstance(state, dict):
            return f"{path}: weights file holds {type(state).__name__}, not a state dict"
        return None

    def iter_paths(self) -> Iterator[Path]:
        cells = self.root / "cells"
        if not cells.is_dir():
            return iter(())
        return iter(sorted(cells.glob("*/*/*/*/fold*.json")))

    def records(self, status: str | None = None, **filters: Any) -> list[dict]:
        """Every record (``ok`` and ``error``) whose fields equal ``filters``; a filter value may be a list/set/tuple
        of accepted values. ``status="ok"`` keeps only successful cells. Sorted by cell, then fold. Raises
        ValueError on an unreadable record (:meth:`load_all` reports them instead)."""
        return self.select([self._load(path) for path in self.iter_paths()], status, **filters)

    def load_all(self) -> tuple[list[dict], list[str]]:
        """Every readable record, and the paths of the unreadable ones (each read once)."""
        loaded, unreadable = [], []
        for path in self.iter_paths():
            try:
                loaded.append(self._load(path))
            except ValueError:
                unreadable.append(str(path))
        return loaded, unreadable

    @staticmethod
    def select(records: list[dict], status: str | None = None, **filters: Any) -> list[dict]:
        """The records matching ``status`` and ``filters`` as in :meth:`records` (for records already loaded)."""
        out = []
        for record in records:
            if status is not None and record.get("status") != status:
                continue
            ok = True
            for key, want in filters.items():
                if want is None:
                    continue
                have = record.get(key)
                if isinstance(want, (list, tuple, set, frozenset)):
                    ok = have in want or str(have) in {str(w) for w in want}
                else:
                    ok = have == want or str(have) == str(want)
                if not ok:
                    break
            if ok:
                out.append(record)
        out.sort(key=lambda r: (r["method"], r["cohort"], r["backbone"], r["recipe"], r["selection"], int(r["seed"]),
                                int(r.get("repeat") or 0), int(r["fold"])))
        return out


def cell_record(cell: Cell, **fields: Any) -> dict:
    """A record skeleton with the cell's coordinates and the contract's fields (defaults None)."""
    base = asdict(cell)
    base.update(
        schema=SCHEMA, status=None, label=None, config=None, config_hash=None, provenance=None, metrics=None,
        selected_epoch=None, history=None, bin_edges=None, train_risk_median=None, predictions=None, error=None,
        seconds=None, weights=None,
    )
    base.update(fields)
    return base
