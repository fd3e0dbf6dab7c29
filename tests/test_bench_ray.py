"""The bench on Ray: runs as Ray tasks on a local instance and on a two-node cluster on loopback.

The same tiny suite (head-only and LoRA, 2 real steps each on MiniLM-L6) runs through forked
children, through a local Ray instance and through a head + worker cluster started here; the
records must agree in every field but the measured times, loads and memory, and where they ran.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from peftlab.bench import report, runner, suite as suites
from peftlab.errors import PeftlabError

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'peftlab[ray]')")
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test files: send the code

# Measured, not computed: they differ between any two runs of the same config (and `node`, `run_dir`
# say where a run happened).
MEASURED = {"bench_time_s", "finished_at", "wall_time_s", "train_time_s", "s_per_step", "train_cpu_time_s",
            "cpu_s_per_step", "cpu_time_s", "peak_rss_mb", "machine", "node", "run_dir", "init_time_s",
            "latency_ms", "validation_curve"}
TINY = {
    "run": {"model": "minilm-l6", "data": {"max_length": 32, "limit": 160},
            "train": {"steps": 2, "batch_size": 8, "eval_batch_size": 32, "save_every": 1000, "progress": False},
            "optimizer": {"name": "adamw"}},
    "tasks": ["movie-sentiment"], "seeds": [0], "methods": ["lora"], "baselines": ["head-only"],
    "method_fields": {"targets": ["query", "value"]}, "lr": {"default": [1e-3]},
    "workers": 2, "threads": 1, "resources": {"cpus": 1},
}


def comparable(record: dict) -> dict:
    kept = {k: copy.deepcopy(v) for k, v in record.items() if k not in MEASURED}
    kept["config"].pop("output")  # the run directory, which differs by design (config_hash leaves it out)
    kept["versions"].pop("peftlab_commit")  # the shared checkout's HEAD may move while the test runs
    return kept


def by_run(records: list[dict]) -> dict[str, dict]:
    return {r["run"]: r for r in records}


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """The tiny suite's records through forked children and through a local Ray instance the bench starts."""
    base = tmp_path_factory.mktemp("local")
    tiny = suites.parse(TINY, name="tiny")
    records = {}
    for executor in ("fork", "ray"):
        lines = []
        records[executor] = runner.run_suite(tiny, base / f"results-{executor}", base / f"runs-{executor}",
                                             echo=lines.append, executor=executor)
        assert all(r["status"] == "ok" for r in records[executor]), [r.get("error") for r in records[executor]]
    assert not ray.is_initialized()  # the bench's own local instance is shut down again
    return records


def test_ray_tasks_give_the_forked_runs_records(local_runs):
    forked, rayed = by_run(local_runs["fork"]), by_run(local_runs["ray"])
    assert sorted(forked) == sorted(rayed) == ["head-only--movie-sentiment--s0", "lora--movie-sentiment--s0"]
    for name, record in rayed.items():
        assert comparable(record) == comparable(forked[name]), name
        assert set(record) - set(forked[name]) == {"node"} and record["node"]["id"]
        assert record["machine"]["torch_threads"] == forked[name]["machine"]["torch_threads"] == 1
        # a fresh worker per run: its own peak, the same order as a forked child's
        assert 100 < record["peak_rss_mb"] < 3 * forked[name]["peak_rss_mb"]
    lora = rayed["lora--movie-sentiment--s0"]
    assert lora["trainable_parameters"] == 6 * 2 * 8 * (384 + 384) + 770 and lora["metrics"]["test"]["accuracy"] > 0


def test_the_report_ignores_the_node_field(local_runs, tmp_path):
    tiny = suites.parse(TINY, name="tiny")
    pages = []
    for keep_node in (True, False):
        results = tmp_path / f"results-{keep_node}"
        for record in local_runs["ray"]:
            runner.write_record(runner.record_path(results, suites.Job(record["method"], record["task"], 0, "final")),
                                record if keep_node else {k: v for k, v in record.items() if k != "node"})
        pages.append(report.markdown(tiny, runner.read_records(results), plots=[]))
    assert pages[0] == pages[1] and "lora" in pages[0]


# ---- refusals ------------------------------------------------------------------------------------


def crashing_run(job, config, run_dir, suite):
    """A stand-in for training: LoRA raises, DoRA's process dies, head-only finishes; each attempt leaves a line."""
    with open(run_dir.parent / f"{job.name}.attempts", "a") as attempts:
        attempts.write(f"{os.getpid()}\n")
    if job.method == "lora":
        raise RuntimeError(f"boom in {os.getpid()}")
    if job.method == "dora":
        os._exit(3)  # as a run killed for memory
    return {"metrics": {"test": {"accuracy": 0.75}}, "steps": 1, "pid": os.getpid()}


def test_bad_resources_and_executor_choices_are_refused(monkeypatch):
    with pytest.raises(PeftlabError, match="resources.cpus must be a number > 0"):
        suites.parse({**TINY, "resources": {"cpus": 0}}, name="t")
    with pytest.raises(PeftlabError, match="resources allows cpus and gpus; unknown: \\['memory'\\]"):
        suites.parse({**TINY, "resources": {"memory": 4}}, name="t")
    assert suites.parse({**TINY, "resources": None, "threads": 3}, name="t").resources == {"cpus": 3, "gpus": 0}
    tiny = suites.parse(TINY, name="t")
    with pytest.raises(PeftlabError, match="leave out --executor fork"):
        runner.make_executor(crashing_run, tiny, 1, None, "fork", address="auto")
    with pytest.raises(PeftlabError, match="executor 'slurm' is unknown"):
        runner.make_executor(crashing_run, tiny, 1, None, "slurm")
    lines = []
    monkeypatch.setattr(runner.importlib.util, "find_spec", lambda name: None)  # as without ray installed
    with pytest.raises(PeftlabError, match="pip install 'peftlab\\[ray\\]'"):
        runner.make_executor(crashing_run, tiny, 1, None, "ray")
    assert type(runner.make_executor(crashing_run, tiny, 1, None, "auto", echo=lines.append)).__name__ == "Forked"
    assert lines == ["ray is not installed: runs in forked processes on this machine "
                     "(`pip install 'peftlab[ray]'` for Ray)"]


# ---- a two-node cluster on loopback --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(env: dict, temp_dir: str, *args: str) -> int:
    """`ray start ...` in its own process group, which the node's processes keep: stopping it stops only them."""
    ray_cli = pathlib.Path(sys.executable).parent / "ray"
    for _ in range(2):  # on a loaded machine a node can miss its start-up deadline once
        starter = subprocess.Popen([str(ray_cli), "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                    f"--temp-dir={temp_dir}"], env=env, start_new_session=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = starter.communicate(timeout=180)
        if starter.returncode == 0:
            return starter.pid  # the process group's id
        stop_nodes([starter.pid])
    raise AssertionError(f"`ray start {' '.join(args)}` failed twice:\n{output}")


def stop_nodes(groups: list[int]) -> None:
    """What `ray stop` does, for these nodes only (`ray stop` ends every Ray process on the machine)."""
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        for group in groups:
            try:
                os.killpg(group, signal_number)
            except ProcessLookupError:
                pass
        time.sleep(1)


CRASH = {**TINY, "methods": ["lora", "dora"], "seeds": [0, 1], "workers": 3, "resources": {"cpus": 0.5}}
GREEDY = {**TINY, "resources": {"cpus": 2}}  # each node has one CPU


def drive_cluster(address: str, out: str) -> None:
    """The cluster's driver, in a process of its own (Ray reads a process's auth token once, at its first use).

    The tiny suite through `python -m peftlab.bench ... --address`; six stand-in runs (two finish, two raise, two
    kill their worker), three at a time; a suite whose runs no node can hold.
    """
    from peftlab import bench

    out = pathlib.Path(out)
    (out / "tiny.yaml").write_text(json.dumps(TINY))
    print("bench exit", bench.main([str(out / "tiny.yaml"), "--address", address, "--results", str(out / "results"),
                                    "--runs", str(out / "runs"), "--no-report"]))
    runner.run_suite(suites.parse(CRASH, name="crash"), out / "crash", out / "crash-runs", run_one=crashing_run,
                     echo=print, executor="ray", address=address)
    try:
        runner.run_suite(suites.parse(GREEDY, name="greedy"), out / "greedy", out / "greedy-runs",
                         run_one=crashing_run, echo=print, executor="ray", address=address)
    except PeftlabError as err:
        print(f"refused: {err}")
    print("still connected" if ray.is_initialized() else "disconnected")


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory) -> tuple[str, pathlib.Path]:
    """A head and a worker node, one CPU each, on loopback, in their own temporary directories and with their own
    auth token, running `drive_cluster`: (its output, its directory)."""
    out = tmp_path_factory.mktemp("cluster")
    port, groups = free_port(), []
    head_dir, worker_dir = (tempfile.mkdtemp(prefix=f"pr{n}-", dir="/tmp") for n in ("h", "w"))  # short socket paths
    token = pathlib.Path(head_dir) / "token"
    token.write_text(secrets.token_hex(32))
    tests = pathlib.Path(__file__).parent
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        groups.append(start_node(env, head_dir, "--head", f"--port={port}", "--include-dashboard=false"))
        groups.append(start_node(env, worker_dir, f"--address=127.0.0.1:{port}"))
        driver = subprocess.run([sys.executable, "-c", f"import test_bench_ray as t; t.drive_cluster("
                                 f"'127.0.0.1:{port}', {str(out)!r})"], env=env, capture_output=True, text=True,
                                timeout=900)
    finally:
        stop_nodes(groups)
        for temp_dir in (worker_dir, head_dir):
            shutil.rmtree(temp_dir, ignore_errors=True)
    assert driver.returncode == 0, driver.stdout + driver.stderr
    return driver.stdout, out


def test_a_two_node_cluster_runs_the_suite_with_the_local_records(local_runs, cluster_runs):
    """`peftlab bench SUITE --address 127.0.0.1:PORT`: both nodes run, the records are the local ones."""
    output, out = cluster_runs
    assert "bench exit 0" in output and "runs as Ray tasks on the cluster at 127.0.0.1:" in output
    assert output.rstrip().endswith("disconnected")
    clustered = by_run(runner.read_records(out / "results"))
    local = by_run(local_runs["ray"])
    assert sorted(clustered) == sorted(local)
    assert len({r["node"]["id"] for r in clustered.values()}) == 2  # each node ran one of the two runs
    for name, record in clustered.items():
        assert record["status"] == "ok" and comparable(record) == comparable(local[name]), name


def test_on_the_cluster_a_crashing_run_fails_its_record_and_the_bench_goes_on(cluster_runs):
    output, out = cluster_runs
    records = by_run(runner.read_records(out / "crash"))
    assert len(records) == 6
    for seed in (0, 1):
        ok, raised, died = (records[f"{m}--movie-sentiment--s{seed}"] for m in ("head-only", "lora", "dora"))
        assert ok["status"] == "ok" and ok["metrics"]["test"]["accuracy"] == 0.75 and ok["node"]["id"]
        assert raised["status"] == "failed" and raised["error"].startswith("RuntimeError: boom in ")
        assert died["status"] == "failed" and "Ray worker ended before reporting (WorkerCrashedError" in died["error"]
    attempts = {p.stem: p.read_text().split() for p in (out / "crash-runs").glob("*.attempts")}
    assert sorted(attempts) == sorted(records) and all(len(a) == 1 for a in attempts.values())  # none retried
    assert len({a[0] for a in attempts.values()}) == 6  # a fresh worker process for every run


def test_on_the_cluster_a_run_no_node_can_hold_is_refused_before_any_run(cluster_runs):
    output, out = cluster_runs
    assert ("refused: resources: a run asks for 2 CPUs and 0 GPUs, but no Ray node has that much (the largest has "
            "1 CPUs, 0 GPUs)") in output
    assert not (out / "greedy").exists() and not (out / "greedy-runs").exists()
