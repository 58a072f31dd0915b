"""Where a grid's cells run: in this process, in local worker processes, or as Ray tasks on a cluster.

Every executor runs ``work(task, on_epoch)`` for each submitted task (the runner passes
``benchmark.execution.cells.execute_cell``, which trains one cell under its lock and writes its record) and hands
back ``(key, summary)`` pairs as cells finish. The runner drives all of them the same way::

    executor.start()                      # connect, validate resources (ValueError = bad input, before any cell)
    for key, task in tasks: executor.submit(key, task)
    while executor.pending: for key, summary in executor.results(timeout=0.25): ...
    executor.cancel()                     # on SIGINT / SIGTERM: drop queued cells, stop running ones
    executor.close()

- :class:`InlineExecutor`: one cell at a time in this process (``--jobs 1``; tests inject a cohort loader).
- :class:`LocalExecutor`: ``--jobs N`` spawned worker processes, each with its own task channel, so the parent
  always knows which cell each worker holds. Workers ignore SIGINT (the parent decides), leave through their
  ``finally`` blocks on SIGTERM (cell locks are released) and exit when their parent dies (``PR_SET_PDEATHSIG`` on
  Linux, plus a thread that watches ``os.getppid()`` everywhere). A worker that dies mid-cell is reported as an
  error for that cell and replaced.
- :class:`RayExecutor`: ``--executor ray``: each cell is a Ray task (``@ray.remote`` with ``num_cpus``,
  ``num_gpus`` and ``max_retries``), so a cell whose worker dies is retried by Ray and the grid completes.
"""
from __future__ import annotations

import ctypes
import os
import queue as queue_module
import signal
import socket
import sys
import threading
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

from benchmark.naming import Registry

#: ``work(task, on_epoch)`` -> summary dict; must be a module-level function (it is pickled to workers).
Work = Callable[..., dict]
#: ``on_progress(key, epoch, epochs)``
ProgressCallback = Callable[[str, int, int], None]
#: Seconds a stopped worker gets to leave through its ``finally`` blocks before it is killed.
STOP_GRACE_S = 3.0
_PR_SET_PDEATHSIG = 1


def failed_summary(key: str, why: str) -> dict:
    """The summary of a cell that produced no summary of its own (its worker died, Ray gave up)."""
    return {"cell": key, "status": "error", "c_index": None, "seconds": None, "error": why}


class Executor(ABC):
    """Runs submitted tasks with :attr:`work` and reports their summaries."""

    name = "executor"

    def __init__(self, work: Work, on_progress: ProgressCallback | None = None) -> None:
        self.work, self.on_progress = work, on_progress
        self.queued: list[tuple[str, Any]] = []
        self.started = False

    def start(self) -> None:
        """Connect and validate, once (raises ValueError naming the option at fault)."""
        if not self.started:
            self._start()
            self.started = True

    def _start(self) -> None:
        """What :meth:`start` does for this executor."""

    def submit(self, key: str, task: Any) -> None:
        self.queued.append((key, task))

    @property
    @abstractmethod
    def pending(self) -> int:
        """Tasks submitted and not yet reported."""

    @abstractmethod
    def results(self, timeout: float) -> list[tuple[str, dict]]:
        """Summaries of the tasks that finished (waits up to ``timeout`` seconds for one)."""

    def cancel(self) -> None:
        """Drop queued tasks and stop the running ones."""
        self.queued.clear()

    def close(self) -> None:
        """Release workers and connections."""

    @property
    def parallelism(self) -> float:
        """Cells that run at once (for the ETA)."""
        return 1.0


# -------------------------------------------------------------------------------------------------------
# in this process
# -------------------------------------------------------------------------------------------------------
class InlineExecutor(Executor):
    """One task at a time, in this process (a SIGINT interrupts the running cell where it is)."""

    name = "inline"

    def __init__(self, work: Work, on_progress: ProgressCallback | None = None, **work_kwargs: Any) -> None:
        super().__init__(work, on_progress)
        self.work_kwargs = work_kwargs

    @property
    def pending(self) -> int:
        return len(self.queued)

    def results(self, timeout: float) -> list[tuple[str, dict]]:
        if not self.queued:
            return []
        key, task = self.queued.pop(0)

        def on_epoch(epoch: int, epochs: int, info: dict | None = None) -> None:
            if self.on_progress is not None:
                self.on_progress(key, epoch, epochs)

        return [(key, self.work(task, on_epoch=on_epoch, **self.work_kwargs))]


# -------------------------------------------------------------------------------------------------------
# local worker processes
# -------------------------------------------------------------------------------------------------------
def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Make this process leave when ``parent_pid`` dies: SIGTERM from the kernel (Linux ``PR_SET_PDEATHSIG``) and,
    everywhere, a daemon thread that sends SIGTERM when the parent changes (then ``os._exit`` if that is ignored)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10 * poll_s)  # the SIGTERM handler had its chance to run the finally blocks
        os._exit(143)

    if os.getppid() != parent_pid:  # the parent died before we got here
        os._exit(143)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _leave_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _worker_main(work: Work, init: Callable | None, init_args: tuple, tasks, events, parent_pid: int) -> None:
    """A worker process: take tasks from its own channel until it receives None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent decides
    signal.signal(signal.SIGTERM, _leave_on_sigterm)
    exit_with_parent(parent_pid)
    events.cancel_join_thread()  # a stopped worker must not wait at exit for a parent that no longer reads
    if init is not None:
        init(*init_args)
    while True:
        item = tasks.get()
        if item is None:
            return
        key, task = item

        def on_epoch(epoch: int, epochs: int, info: dict | None = None, _key=key) -> None:
            events.put(("epoch", _key, epoch, epochs))

        try:
            summary = work(task, on_epoch=on_epoch)
        except Exception as exc:  # noqa: BLE001 (reported as the cell's error; the worker goes on)
            summary = failed_summary(key, f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
        events.put(("done", key, summary))


class _Worker:
    def __init__(self, context, work: Work, init, init_args: tuple, events) -> None:
        self.tasks = context.SimpleQueue()
        self.process = context.Process(target=_worker_main, daemon=True, name="benchmark-cell-worker",
                                       args=(work, init, init_args, self.tasks, events, os.getpid()))
        self.process.start()
        self.key: str | None = None

    def give(self, key: str, task: Any) -> None:
        self.key = key
        self.tasks.put((key, task))


class LocalExecutor(Executor):
    """``jobs`` spawned worker processes on this machine.

    Parameters
    ----------
    work : callable
        Module-level ``work(task, on_epoch)``.
    jobs : int
        Worker processes.
    init : callable, optional
        Module-level ``init(*init_args)`` run once in each worker (threads, plugins).
    """

    name = "local"

    def __init__(self, work: Work, jobs: int, on_progress: ProgressCallback | None = None,
                 init: Callable | None = None, init_args: tuple = ()) -> None:
        super().__init__(work, on_progress)
        import multiprocessing

        self.jobs, self.init, self.init_args = jobs, init, init_args
        self.context = multiprocessing.get_context("spawn")
        self.events = None
        self.workers: list[_Worker] = []

    @property
    def parallelism(self) -> float:
        return float(self.jobs)

    def _start(self) -> None:
        self.events = self.context.Queue()
        self.workers = [self._new_worker() for _ in range(self.jobs)]

    def _new_worker(self) -> _Worker:
        return _Worker(self.context, self.work, self.init, self.init_args, self.events)

    @property
    def pending(self) -> int:
        return len(self.queued) + sum(1 for w in self.workers if w.key is not None)

    def _dispatch(self) -> None:
        for worker in self.workers:
            if worker.key is None and self.queued:
                worker.give(*self.queued.pop(0))

    def results(self, timeout: float) -> list[tuple[str, dict]]:
        self._dispatch()
        done: list[tuple[str, dict]] = []
        deadline = time.monotonic() + timeout
        while not done and time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=max(0.01, min(0.1, deadline - time.monotonic())))
            except queue_module.Empty:
                done.extend(self._reap_dead_workers())
                continue
            done.extend(self._handle(event))
        self._dispatch()
        return done

    def _handle(self, event: tuple) -> list[tuple[str, dict]]:
        """An event of a worker: epoch progress, or a finished cell (its worker becomes idle)."""
        if event[0] == "epoch" and self.on_progress is not None:
            self.on_progress(*event[1:])
        if event[0] != "done":
            return []
        for worker in self.workers:
            if worker.key == event[1]:
                worker.key = None
        return [(event[1], event[2])]

    def _reap_dead_workers(self) -> list[tuple[str, dict]]:
        """Replace workers that died (e.g. killed for memory); their cell is reported as failed."""
        out = []
        for i, worker in enumerate(self.workers):
            if worker.process.is_alive():
                continue
            if worker.key is not None:
                out.append((worker.key, failed_summary(worker.key, f"worker died (exit code {worker.process.exitcode})")))
            self.workers[i] = self._new_worker()
        return out

    def cancel(self) -> None:
        super().cancel()
        self._stop_workers()

    def _stop_workers(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: the worker leaves through its finally blocks
        deadline = time.monotonic() + STOP_GRACE_S
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(1.0)
            worker.key = None

    def close(self) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.tasks.put(None)
        for worker in self.workers:
            worker.process.join(STOP_GRACE_S)
        self._stop_workers()
        if self.events is not None:
            self.events.close()
            self.events.join_thread()


# -------------------------------------------------------------------------------------------------------
# Ray
# -------------------------------------------------------------------------------------------------------
def import_ray():
    """``import ray``, or a one-line ValueError naming ``--executor ray`` when it is not installed."""
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray: Ray is not installed (pip install '.[ray]' or "
                         "pip install -r requirements-ray.lock)") from None
    return ray


def check_reachable(address: str | None, timeout_s: float = 3.0) -> None:
    """A TCP connect to ``host:port`` of ``--address`` (``ray://host:port`` or ``host:port``), so an unreachable
    cluster is one line in seconds rather than Ray's long connection retries. ``auto``/None are left to Ray."""
    if not address or address == "auto" or address.startswith("local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.hostname is None or parsed.port is None:
        raise ValueError(f"--address {address}: expected auto, host:port or ray://host:port")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ValueError(f"--address {address}: cannot reach {parsed.hostname}:{parsed.port} "
                         f"({exc.strerror or exc})") from None


def _ray_cell(work: Work, init: Callable | None, init_args: tuple, task: Any) -> dict:
    """The body of a cell's Ray task (on a worker of the cluster)."""
    if init is not None:
        init(*init_args)
    return work(task, on_epoch=None)


def _ray_probe_store(root: str) -> str | None:
    """Write and remove a probe file in the store on this node; the error text when it fails."""
    import tempfile

    try:
        os.makedirs(root, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=".write-probe.", dir=root)
        os.close(fd)
        os.unlink(path)
        return None
    except OSError as exc:
        return f"{socket.gethostname()}: {exc.strerror or exc}"


class RayExecutor(Executor):
    """Each cell a Ray task with ``num_cpus`` / ``num_gpus`` and ``max_retries`` (a dead worker's cell is retried).

    Parameters
    ----------
    address : str, optional
        ``auto``, ``ray://host:port`` or ``host:port``; None uses ``RAY_ADDRESS`` or starts a local Ray.
    cpus_per_cell, gpus_per_cell : float
        Resources of each cell's task (``gpus_per_cell=0.5`` packs two cells on a GPU).
    store_root : str, optional
        Checked writable from every node before any cell starts.
    shared_roots : tuple of str
        Other folders every node must write (a tuner's study journal), checked the same way.
    """

    name = "ray"

    def __init__(self, work: Work, address: str | None = None, cpus_per_cell: float = 1.0,
                 gpus_per_cell: float = 0.0, max_retries: int = 3, init: Callable | None = None,
                 init_args: tuple = (), store_root: str | None = None, shared_roots: tuple[str, ...] = ()) -> None:
        super().__init__(work)
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_cell, self.gpus_per_cell, self.max_retries = cpus_per_cell, gpus_per_cell, max_retries
        self.init, self.init_args, self.store_root = init, init_args, store_root
        self.shared_roots = tuple(shared_roots)
        self.ray = None
        self.refs: dict[Any, str] = {}
        self._parallelism = 1.0

    @property
    def parallelism(self) -> float:
        return self._parallelism

    def _start(self) -> None:
        ray = self.ray = import_ray()
        check_reachable(self.address)
        try:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"--address {self.address or 'auto'}: cannot connect to Ray "
                             f"({str(exc).splitlines()[0]})") from None
        resources = ray.cluster_resources()
        if self.gpus_per_cell > 0 and resources.get("GPU", 0) <= 0:
            raise ValueError(f"--gpus-per-cell {self.gpus_per_cell:g}: the Ray cluster has no GPU")
        if resources.get("CPU", 0) < self.cpus_per_cell:
            raise ValueError(f"--cpus-per-cell {self.cpus_per_cell:g}: the Ray cluster has only "
                             f"{resources.get('CPU', 0):g} CPU(s)")
        self._parallelism = max(1.0, resources.get("CPU", 1) // self.cpus_per_cell)
        if self.gpus_per_cell > 0:
            self._parallelism = min(self._parallelism, max(1.0, resources["GPU"] // self.gpus_per_cell))
        self._check_store_on_every_node()
        self.remote = ray.remote(_ray_cell).options(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell,
                                                    max_retries=self.max_retries)

    def _check_store_on_every_node(self) -> None:
        """The store (and the shared roots) must be on a filesystem every node can write (cells write their
        records themselves; study workers write the study journal)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = self.ray.remote(_ray_probe_store)
        roots = [(root, "--results") for root in [self.store_root] if root is not None]
        for root, option in roots + [(root, "--storage") for root in self.shared_roots]:
            refs = [probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"],
                                                                                                 soft=False))
                    .remote(root) for node in self.ray.nodes() if node.get("Alive")]
            problems = [p for p in self.ray.get(refs, timeout=60) if p]
            if problems:
                raise ValueError(f"{option} {root}: not writable on every Ray node ({problems[0]}); it must be on a "
                                 "filesystem all nodes share")

    def submit(self, key: str, task: Any) -> None:
        self.refs[self.remote.remote(self.work, self.init, self.init_args, task)] = key

    @property
    def pending(self) -> int:
        return len(self.refs)

    def results(self, timeout: float) -> list[tuple[str, dict]]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=timeout)
        done = []
        for ref in ready:
            key = self.refs.pop(ref)
            try:
                done.append((key, self.ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 (retries exhausted, or the task raised)
                done.append((key, failed_summary(key, f"Ray task failed: {type(exc).__name__}: "
                                                      f"{str(exc).splitlines()[0] if str(exc) else ''}")))
        return done

    def cancel(self) -> None:
        for ref in list(self.refs):
            try:
                self.ray.cancel(ref, force=True)  # queued tasks are dropped, running workers killed
            except Exception:  # noqa: BLE001 (already finished)
                pass
        self.refs.clear()

    def close(self) -> None:
        if self.ray is not None and self.ray.is_initialized():
            self.ray.shutdown()


# -------------------------------------------------------------------------------------------------------
# the registry of executor kinds (``--executor``)
# -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExecutorRequest:
    """What any executor kind is built from: the work function, its worker initialiser and the resources."""

    work: Work
    jobs: int = 1
    init: Callable | None = None
    init_args: tuple = ()
    address: str | None = None
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0
    store_root: str | None = None
    shared_roots: tuple[str, ...] = ()
    loader: Any = None  # tests inject a cohort loader (in-process execution only)


@dataclass(frozen=True)
class ExecutorKind:
    """One ``--executor`` value: how it is built, what it checks before any cell, and how it is described.

    ``check(experiment)`` raises a one-line ValueError for settings that cannot work (missing package,
    unreachable cluster, device); ``cells_at_a_time(experiment)`` feeds the dry run's estimate; ``where``
    describes it in headers; ``absolute_paths``: its workers run in another folder, so every path is made
    absolute before it is sent.
    """

    name: str
    description: str
    build: Callable[[ExecutorRequest], Executor]
    check: Callable[[Any], None]
    cells_at_a_time: Callable[[Any], float]
    where: Callable[[Any], str]
    absolute_paths: bool = False


EXECUTORS = Registry("executor", option="--executor")


def register_executor(kind: ExecutorKind) -> ExecutorKind:
    """Add an executor kind: every command, check, header and the docs list read this registry."""
    return EXECUTORS.register(kind.name, kind)


def get_executor_kind(name: str) -> ExecutorKind:
    return EXECUTORS.get(name)


def _check_device(device: str, precision: str, gpus_per_cell: float) -> None:
    import torch

    from benchmark.fitting.precision import check_precision, resolve_device

    check_precision(precision, resolve_device(device))
    if gpus_per_cell > 0 and not torch.cuda.is_available():
        raise ValueError(f"--gpus-per-cell {gpus_per_cell:g}: this machine has no CUDA GPU")


def _build_local(request: ExecutorRequest) -> Executor:
    if request.jobs <= 1 or request.loader is not None:
        return InlineExecutor(request.work, loader=request.loader)
    return LocalExecutor(request.work, request.jobs, init=request.init, init_args=request.init_args)


def _check_ray(experiment) -> None:
    """Ray installed and the cluster reachable; the workers' devices are checked against its resources."""
    from benchmark.fitting.precision import check_precision

    import_ray()
    check_reachable(experiment.address)
    check_precision(experiment.shared.precision, "cuda" if experiment.gpus_per_cell > 0 else None)


def _build_ray(request: ExecutorRequest) -> Executor:
    return RayExecutor(request.work, address=request.address, cpus_per_cell=request.cpus_per_cell,
                       gpus_per_cell=request.gpus_per_cell, init=request.init, init_args=request.init_args,
                       store_root=request.store_root, shared_roots=request.shared_roots)


register_executor(ExecutorKind(
    "local", "this machine: in this process for --jobs 1, else --jobs worker processes",
    build=_build_local,
    check=lambda e: _check_device(e.device, e.shared.precision, e.gpus_per_cell),
    cells_at_a_time=lambda e: float(e.jobs),
    where=lambda e: "this process" if e.jobs <= 1 else "local worker processes"))
register_executor(ExecutorKind(
    "ray", "a Ray cluster (--address): each cell a Ray task, retried when its worker dies",
    build=_build_ray, check=_check_ray, cells_at_a_time=lambda e: 1.0,
    where=lambda e: f"Ray tasks ({e.address or 'RAY_ADDRESS or a local Ray'})", absolute_paths=True))
