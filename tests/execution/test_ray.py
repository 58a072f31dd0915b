"""Acceptance of the Ray executor on a local cluster on the loopback address (a head without CPUs and two worker
nodes with one CPU each, token authentication off): the same Table 1 as the local executor, also when a worker
process is killed mid-grid, and from two shards; bad cluster options are one line before any cell.

Skipped when Ray is not installed (``make test-ray`` installs ``requirements-ray.lock`` and runs these).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]
RAY_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO),
           "COLUMNS": "200"}
RAY_ENV.pop("RAY_ADDRESS", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(args: list[str], temp_dir: Path) -> subprocess.Popen:
    """``ray start --block`` in its own session (so the whole node can be stopped by its process group)."""
    ray_cli = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_cli), "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
                             *args], env=RAY_ENV, cwd=temp_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if "Ray runtime started" in line:
            return proc
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise RuntimeError("a Ray node did not start")


def stop_nodes(nodes: list[subprocess.Popen], marker: str) -> None:
    """Kill each node's process group, then any process of this cluster that left the group (found by its port)."""
    for proc in reversed(nodes):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    for p in psutil.process_iter(["pid", "cmdline"]):
        if marker in " ".join(p.info["cmdline"] or []):
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    temp_dir = tmp_path_factory.mktemp("ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [start_node(["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard", "false",
                         "--temp-dir", str(temp_dir)], temp_dir)]
    try:
        for _ in range(2):
            nodes.append(start_node(["--address", address, "--num-cpus", "1"], temp_dir))
        yield address
    finally:
        stop_nodes(nodes, f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from benchmark.data.synth import generate

    return generate(tmp_path_factory.mktemp("data") / "tiny", preset="tiny", seed=0, cohorts=("blca", "ucec"),
                    backbones=("resnet50",), signal="mixed")


def run_args(tiny_data, results, *extra):
    return [sys.executable, "-m", "benchmark", "run", "--methods", "amil,dsmil", "--dataset", "blca,ucec", "--folds",
            "0-1", "--data-root", str(tiny_data), "--recipe", "demo", "--set", "epochs=2", "--results", str(results),
            *extra]


def run(args, timeout=300):
    proc = subprocess.run(args, cwd=REPO, env=RAY_ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def table1(results) -> str:
    out = results.parent / f"{results.name}.md"
    run([sys.executable, "-m", "benchmark", "table", "1", "--results", str(results), "--format", "md", "--out", str(out)])
    return out.read_text()


def risks(results) -> dict:
    from benchmark.store.records import ResultStore

    return {r["_path"].split("cells/")[1]: [p["risk"] for p in r["predictions"]]
            for r in ResultStore(results).records(status="ok")}


@pytest.fixture(scope="module")
def local_reference(tiny_data, tmp_path_factory):
    results = tmp_path_factory.mktemp("local") / "store"
    run(run_args(tiny_data, results, "--jobs", "2"))  # workers with one torch thread, as the Ray tasks
    return results


def test_ray_executor_gives_the_local_table(ray_cluster, tiny_data, local_reference, tmp_path):
    results = tmp_path / "store"
    proc = run(run_args(tiny_data, results, "--executor", "ray", "--address", ray_cluster))
    assert "8 cell(s) run" in proc.stdout and "0 error(s)" in proc.stdout
    assert table1(results) == table1(local_reference)
    assert risks(results) == risks(local_reference)  # bit-identical predictions, not just the rounded table


def test_a_killed_ray_worker_is_retried_and_the_grid_completes(ray_cluster, tiny_data, local_reference, tmp_path):
    results = tmp_path / "store"
    proc = subprocess.Popen(run_args(tiny_data, results, "--executor", "ray", "--address", ray_cluster), cwd=REPO,
                            env=RAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.monotonic() + 180
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        for lock in results.rglob("*.lock"):
            try:
                victim = int(__import__("json").loads(lock.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                continue
            os.kill(victim, signal.SIGKILL)  # the Ray worker process computing this cell
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert victim is not None, "no cell was seen running"
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    assert table1(results) == table1(local_reference)


def test_two_shards_on_one_store_give_the_local_table(tiny_data, local_reference, tmp_path):
    results = tmp_path / "store"
    shards = [subprocess.Popen(run_args(tiny_data, results, "--shard", f"{i}/2"), cwd=REPO, env=RAY_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in shards]
    assert [p.returncode for p in shards] == [0, 0], outs
    assert all("8 cells, shard" in out and ": 4, executor local" in out for out, _ in outs)
    assert table1(results) == table1(local_reference)


def test_bad_cluster_options_are_one_line_before_any_cell(ray_cluster, tiny_data, tmp_path):
    for extra, message in [
        (["--address", f"127.0.0.1:{free_port()}"], "error: --address 127.0.0.1:"),
        (["--address", f"ray://127.0.0.1:{free_port()}"], "error: --address ray://127.0.0.1:"),
        (["--address", ray_cluster, "--gpus-per-cell", "0.5"], "error: --gpus-per-cell 0.5: the Ray cluster has no GPU"),
    ]:
        started = time.monotonic()
        proc = subprocess.run(run_args(tiny_data, tmp_path / "store", "--executor", "ray", *extra), cwd=REPO,
                              env=RAY_ENV, capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), proc.stderr
        assert time.monotonic() - started < 60 and not list((tmp_path / "store").rglob("*.json"))


def test_sigint_cancels_the_ray_grid(ray_cluster, tiny_data, tmp_path):
    results = tmp_path / "store"
    args = run_args(tiny_data, results, "--executor", "ray", "--address", ray_cluster)
    args[args.index("epochs=2")] = "epochs=60"
    proc = subprocess.Popen(args, cwd=REPO, env=RAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(results.rglob("*.lock")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - sent < 20 and proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "of 8 cells finished; rerun the same command to resume" in out and "Traceback" not in out + err


def test_tune_runs_study_workers_as_ray_tasks(ray_cluster, tiny_data, tmp_path):
    """``tune --executor ray --jobs 2``: the study's two workers are Ray tasks sharing its journal; one is killed
    mid-trial (Ray retries it, the trial it left is redone), and the study ends with exactly its budget and a
    tuned record."""
    import optuna
    from optuna.trial import TrialState

    from benchmark.tuning.study import open_storage

    results, storage = tmp_path / "store", tmp_path / "store" / "tuning" / "optuna.journal"
    args = [sys.executable, "-m", "benchmark", "tune", "--methods", "amil", "--dataset", "blca", "--folds", "0",
            "--data-root", str(tiny_data), "--recipe", "demo", "--set", "epochs=2", "max_samples_per_epoch=24",
            "--trials", "6", "--inner-folds", "2", "--results", str(results), "--executor", "ray", "--address",
            ray_cluster, "--jobs", "2"]
    proc = subprocess.Popen(args, cwd=REPO, env=RAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim, deadline = None, time.monotonic() + 180
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        studies = optuna.get_all_study_names(open_storage(str(storage), None)) if storage.exists() else []
        running = [t for name in studies for t in optuna.load_study(study_name=name, storage=open_storage(
            str(storage), None)).get_trials(states=(TrialState.RUNNING,)) if "worker" in t.user_attrs]
        if running:
            victim = running[0].user_attrs["worker"]["pid"]
            os.kill(victim, signal.SIGKILL)  # the Ray worker process running this trial
        time.sleep(0.05)
    out, err = proc.communicate(timeout=300)
    assert victim is not None, "no trial was seen running"
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "as Ray tasks" in out and "1 outer fold(s) tuned" in out and "0 error(s)" in out
    (name,) = optuna.get_all_study_names(open_storage(str(storage), None))
    study = optuna.load_study(study_name=name, storage=open_storage(str(storage), None))
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 6
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed and all(t.user_attrs.get("interrupted") for t in failed), out[-3000:]  # the killed worker's trial
    assert os.getpid() not in {t.user_attrs["worker"]["pid"] for t in study.trials} and victim != proc.pid
    (record,) = [json.loads(p.read_text()) for p in (results / "cells").rglob("fold0.json")]
    assert record["status"] == "ok" and record["config"]["tuning"]["params"] == study.best_trial.params
