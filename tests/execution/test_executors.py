"""Executors and the run command's process hygiene: local workers (a dead worker's cell is reported, the rest
runs), SIGINT / SIGTERM stop the grid (exit 130, resume hint, no traceback, no worker left, no lock left), workers
exit when their parent is killed, bad execution options are one line before any cell, --dry-run."""
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmark.execution.executors import InlineExecutor, LocalExecutor

REPO = Path(__file__).resolve().parents[2]


def toy_work(task, on_epoch=None):
    """Module-level (workers import it): ``task`` = (value, action)."""
    value, action = task
    if action == "die":
        os._exit(9)
    if action == "raise":
        raise RuntimeError("planted")
    if on_epoch is not None:
        on_epoch(1, 1, {})
    return {"cell": f"c{value}", "status": "ok", "value": value * value, "pid": os.getpid()}


def drain(executor, timeout=60.0):
    out, deadline = {}, time.monotonic() + timeout
    while executor.pending and time.monotonic() < deadline:
        out.update(executor.results(timeout=0.25))
    return out


def test_inline_executor_runs_in_this_process():
    seen = []
    executor = InlineExecutor(toy_work, on_progress=lambda *a: seen.append(a))
    executor.start()
    executor.submit("a", (3, None))
    assert drain(executor)["a"]["pid"] == os.getpid() and seen == [("a", 1, 1)]


def test_local_executor_reports_a_dead_worker_and_goes_on():
    executor = LocalExecutor(toy_work, jobs=2)
    executor.start()
    try:
        for i, action in enumerate([None, "die", "raise", None, None]):
            executor.submit(f"k{i}", (i, action))
        out = drain(executor)
    finally:
        executor.close()
    assert set(out) == {f"k{i}" for i in range(5)}
    assert out["k1"]["status"] == "error" and "worker died (exit code 9)" in out["k1"]["error"]
    assert out["k2"]["status"] == "error" and "planted" in out["k2"]["error"]
    assert [out[k]["value"] for k in ("k0", "k3", "k4")] == [0, 9, 16]
    assert all(out[k]["pid"] != os.getpid() for k in ("k0", "k3", "k4"))
    assert not any(w.process.is_alive() for w in executor.workers)


# ---- the run command in a subprocess ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from benchmark.data.synth import generate

    return generate(tmp_path_factory.mktemp("data") / "tiny", preset="tiny", seed=0, cohorts=("blca",),
                    backbones=("resnet50",), signal="mixed")


def run_command(tiny_data, results, *extra, epochs=1):
    return [sys.executable, "-m", "benchmark", "run", "--methods", "amil", "--dataset", "blca", "--data-root",
            str(tiny_data), "--recipe", "demo", "--set", f"epochs={epochs}", "--results", str(results), *extra]


def start(cmd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_locks(results, proc, n=1, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(Path(results).rglob("*.lock"))) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("no cell started")


def descendants(pid):
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def all_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig, jobs", [(signal.SIGINT, 2), (signal.SIGTERM, 1)])
def test_signal_stops_the_grid_cleanly(tiny_data, tmp_path, sig, jobs):
    proc = start(run_command(tiny_data, tmp_path / "r", "--jobs", str(jobs), epochs=40))
    wait_for_locks(tmp_path / "r", proc, n=jobs)
    workers = descendants(proc.pid)
    sent = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "the grid took too long to stop"
    assert proc.returncode == 130, (out, err)
    assert "of 5 cells finished; rerun the same command to resume" in out
    assert "Traceback" not in err and "Traceback" not in out
    assert all_gone(workers)
    assert not list((tmp_path / "r").rglob("*.lock")) and not list((tmp_path / "r").rglob("*.tmp"))


def test_workers_exit_when_the_parent_is_killed(tiny_data, tmp_path):
    proc = start(run_command(tiny_data, tmp_path / "r", "--jobs", "2", epochs=40))
    wait_for_locks(tmp_path / "r", proc, n=2)
    workers = descendants(proc.pid)
    assert len(workers) >= 2
    proc.kill()
    proc.wait()
    assert all_gone(workers), "orphaned workers kept running"
    # the locks the workers held are released (or stale: their pids are gone), so a rerun can take them over
    from benchmark.store.lock import _read_owner, stale_reason

    for lock in (tmp_path / "r").rglob("*.lock"):
        assert stale_reason(lock, _read_owner(lock)) is not None


def test_bad_input_messages(tiny_data, tmp_path, capsys):
    import torch

    from benchmark.cli import main

    cases = [(["--shard", "3/2"], "--shard 3/2: the shard index must be in 0..1"),
             (["--shard", "0/0"], "--shard 0/0: the shard count n must be at least 1"),
             (["--precision", "fp16", "--device", "cpu"], "--precision fp16: needs --device cuda")]
    if not torch.cuda.is_available():
        cases += [(["--device", "cuda"], "--device cuda: CUDA is not available"),
                  (["--gpus-per-cell", "0.5"], "--gpus-per-cell 0.5: this machine has no CUDA GPU")]
    if importlib.util.find_spec("ray") is None:
        cases.append((["--executor", "ray"], "--executor ray: Ray is not installed"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases.append(([], "--results"))
    for extra, message in cases:
        results = blocker / "r" if message == "--results" else tmp_path / "r"
        assert main(run_command(tiny_data, results, *extra)[3:]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
        assert not (tmp_path / "r").exists(), extra
