"""Shards (deterministic, disjoint, covering), cell locks (busy, stale after a real kill, run retries) and the
mode of the files the store writes."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from benchmark.store.lock import CellLock, LockBusy, stale_reason
from benchmark.store.records import Cell, ResultStore
from benchmark.settings.config import Experiment
from benchmark.execution.shard import shard_of
from benchmark.settings.options import parse_shard
from fakes import grid, toy_loader


def test_parse_shard_accepts_i_of_n_and_names_the_option_otherwise():
    assert parse_shard(None) is None and parse_shard("0/1") == (0, 1) and parse_shard(" 2/3 ") == (2, 3)
    for bad, why in [("3/2", "0..1"), ("2/2", "0..1"), ("0/0", "at least 1"), ("-1/2", "0..1"), ("x", "i/n"),
                     ("1", "i/n")]:
        with pytest.raises(ValueError, match=rf"^--shard.*{why}"):
            parse_shard(bad)


def test_shards_are_disjoint_cover_the_grid_and_do_not_depend_on_grid_order():
    configs = Experiment(("amil", "dsmil", "random"), ("blca", "ucec"), folds=(0, 1, 2, 3, 4)).configs(5)
    for n in (1, 2, 3, 7, 40):
        parts = [shard_of(configs, (i, n)) for i in range(n)]
        labels = [c.cell.label() for part in parts for c in part]
        assert sorted(labels) == sorted(c.cell.label() for c in configs) and len(set(labels)) == len(labels)
        assert max(map(len, parts)) - min(map(len, parts)) <= 1  # round-robin: balanced
    reordered = list(reversed(configs))
    assert {c.cell.label() for c in shard_of(reordered, (1, 3))} == {c.cell.label() for c in shard_of(configs, (1, 3))}
    # each shard mixes methods (sorted labels are interleaved over the shards)
    assert {c.method for c in shard_of(configs, (0, 2))} == {"amil", "dsmil", "random"}


def test_lock_is_exclusive_while_its_owner_lives_and_released_after(tmp_path):
    path = tmp_path / "fold0.lock"
    with CellLock(path, heartbeat_s=0.05) as lock:
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and lock.took_over is None
        with pytest.raises(LockBusy, match="held by pid"):
            CellLock(path, token="other run").acquire()
        before = path.stat().st_mtime
        os.utime(path, (before - 5, before - 5))
        time.sleep(0.3)
        assert path.stat().st_mtime > before - 5  # heartbeat touched it
    assert not path.exists()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path):
    path = tmp_path / "fold0.lock"
    code = ("import sys, time; from pathlib import Path; from benchmark.store.lock import CellLock; "
            f"CellLock(Path({str(path)!r})).acquire(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy):
            CellLock(path).acquire()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        child.kill()
    lock = CellLock(path).acquire()
    assert lock.took_over == f"pid {child.pid} is not alive" and json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    path = tmp_path / "fold0.lock"
    owner = {"host": "elsewhere", "pid": 1, "token": "t1"}
    path.write_text(json.dumps(owner))
    assert stale_reason(path, owner) is None
    assert stale_reason(path, owner, token="t1") == "an earlier attempt of this run"
    assert stale_reason(path, owner, now=time.time() + 3600).startswith("no heartbeat")
    old = time.time() - 3600
    os.utime(path, (old, old))
    lock = CellLock(path).acquire()
    assert lock.took_over.startswith("no heartbeat")
    lock.release()


def test_store_files_respect_the_umask(tmp_path):
    store = ResultStore(tmp_path)
    record = {**Cell("amil", "blca", "resnet50", 0).__dict__, "status": "ok"}
    previous = os.umask(0o022)
    try:
        store.write(record, state_dict={})
    finally:
        os.umask(previous)
    cell = Cell("amil", "blca", "resnet50", 0)
    for path in (store.record_path(cell), store.weights_path(cell)):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_unwritable_store_is_one_line_naming_results(tmp_path):
    blocker = tmp_path / "a-file"  # a path below a regular file cannot be created, even by root
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^--results .*not writable"):
        ResultStore(blocker / "store").check_writable()


def test_a_locked_cell_is_busy_and_a_cell_finished_elsewhere_is_skipped(tmp_path):
    from benchmark.execution.cells import CellTask, Execution, execute_cell

    store = ResultStore(tmp_path)
    config = grid(["amil"], [0])[0]
    task = CellTask(config, str(tmp_path), Execution(device="cpu", save_weights=False, token="run-b"))
    with CellLock(store.lock_path(config.cell), token="run-a"):  # another run computes the cell right now
        summary = execute_cell(task, loader=toy_loader)
    assert summary["status"] == "busy" and "being computed by pid" in summary["error"] and not store.has(config.cell)
    assert execute_cell(task, loader=toy_loader)["status"] == "ok"
    assert execute_cell(task, loader=toy_loader)["status"] == "skipped"  # finished meanwhile: not trained twice
    assert not store.lock_path(config.cell).exists()


def test_signals_wait_until_a_record_is_written():
    from benchmark.execution.cells import signals_deferred

    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            written = True  # reached: the signal waits for the block to end
        pytest.fail("the deferred SIGINT was not delivered after the block")
    assert written
