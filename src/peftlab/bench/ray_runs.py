"""Bench runs as Ray tasks: the forked child's `run_job`, on a local Ray instance or on a cluster.

    runs = RayRuns(run_one, suite, workers, threads)                  # a local Ray instance
    runs = RayRuns(run_one, suite, workers, threads, address="auto")  # an existing cluster
    runs.start(key, job, config, run_dir, suite, run_one=None)
    key, outcome = runs.wait()    # outcome: ("ok", result) or ("error", text), as execute.Forked's
    runs.close()

Each run is one Ray task reserving the suite's `resources` (num_cpus, num_gpus). It runs in a
fresh worker process (`max_calls=1`) that calls `execute.run_logged`, the forked child's body
(`run_job` imports the heavy libraries first, as the forked bench's parent does before it
forks), so the record has the same fields, plus `node` (which node ran it). A fresh
process per run keeps peak RSS (getrusage's maximum, per process) the run's own: a reused
worker would report the largest earlier run it held. A task that raises returns the error as
text; a task whose worker or node dies (killed for memory, a lost node) is not retried
(`max_retries=0`) and becomes a failed record, never a failed bench.

A local instance gets workers x resources.cpus logical CPUs, so `workers` runs fit at once as
with forked children; it has no dashboard, keeps the workers' output out of the bench's (each
run logs to <runs>/<job>.log) and keeps its session files in a fresh directory under /tmp
(short: Ray's socket paths must stay under 107 characters), removed on close. Its ports are
Ray's (every interface), guarded by Ray's token authentication, which a local instance turns on
unless RAY_AUTH_MODE says otherwise.

On a cluster a run directory is a path on the node that ran the job: give `--runs` a directory
every node sees (a shared filesystem), so the driver finds them and a final run can evaluate
the selection run that trained its model.

`run_in_worker` is the task's body, usable from any Ray worker (a Tune trial, say);
`ray_session(address, cpus)` is the same connection (local instance or cluster) for other Ray work.
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
import platform
import shutil
import tempfile
from typing import Any, Callable

import ray

from ..errors import PeftlabError
from . import execute
from .suite import Job, Suite


def run_in_worker(run_one, job: Job, config: dict, run_dir: pathlib.Path, suite: Suite, threads: int,
                  cwd: str) -> tuple[str, Any]:
    """One job in this Ray worker: ("ok", result + node) or ("error", text).

    cwd: the driver's working directory, so relative run directories mean the same on this node
    (when it has that directory: on another machine they land in the worker's own).
    """
    if os.path.isdir(cwd):
        os.chdir(cwd)
    status, payload = execute.run_logged(run_one, job, config, run_dir, suite, threads)
    if status == "ok":
        payload = {**payload, "node": node()}
    return status, payload


def node() -> dict[str, str]:
    """Where this task runs: Ray's node id (distinct per node, even on one host), address, host name."""
    return {"id": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address(),
            "host": platform.node()}


class Session:
    """This process's connection to Ray: to the cluster at `address`, or to a local instance of `cpus`
    logical CPUs started here; a connection the process has already is used as it is (and left open)."""

    def __init__(self, address: str | None = None, cpus: int = 1, echo: Callable[[str], None] = print):
        self.started, self.temp_dir = False, None
        if ray.is_initialized():  # already connected (a caller's own instance, a Tune session)
            echo("runs as Ray tasks on the Ray instance this process is connected to")
        elif address:
            self._join(address)
            echo(f"runs as Ray tasks on the cluster at {address} ({len(_alive_nodes())} nodes)")
        else:
            self._start_local(cpus)
            echo(f"runs as Ray tasks on a local Ray instance ({cpus} CPUs)")

    def _join(self, address: str) -> None:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            ray.shutdown()
            raise PeftlabError(f"--address {address}: no Ray cluster answered ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); start one with `ray start "
                               "--head` (with token authentication, set RAY_AUTH_MODE=token here too), or leave "
                               "--address out for a local instance") from None
        self.started = True

    def _start_local(self, cpus: int) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local instance reports nowhere
        self.temp_dir = tempfile.mkdtemp(prefix="peftlab-ray-", dir="/tmp")
        self.started = True
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     _temp_dir=self.temp_dir)
        except Exception as err:  # noqa: BLE001 - e.g. its processes missed their start-up deadline
            self.close()  # whatever of it did start
            raise PeftlabError(f"a local Ray instance did not start ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}): run again when the machine "
                               "is less busy, or use --executor fork") from None

    def close(self) -> None:
        """Disconnect; a local instance started here stops and its session files go."""
        if self.started:
            ray.shutdown()
            self.started = False
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


@contextlib.contextmanager
def ray_session(address: str | None = None, cpus: int = 1, echo: Callable[[str], None] = print):
    """Connected to Ray for the block (a `Session`), disconnected after it, whatever happens."""
    session = Session(address, cpus, echo)
    try:
        yield session
    finally:
        session.close()


class RayRuns:
    """Runs `run_one` for each job as a Ray task; the interface of execute.Forked.

    address: None starts a local instance (closed again by `close`); "auto", "HOST:PORT" or
    "ray://HOST:PORT" joins a running cluster. threads: torch threads per run (None: the
    run's reserved CPUs, at least 1).
    """

    def __init__(self, run_one, suite: Suite, workers: int = 1, threads: int | None = None,
                 address: str | None = None, echo: Callable[[str], None] = print):
        self.run_one = run_one
        cpus, gpus = suite.resources["cpus"], suite.resources["gpus"]
        self.threads = threads or max(1, int(cpus))
        self.running: dict[Any, Any] = {}  # Ray object ref -> key
        self.session = Session(address, math.ceil(workers * cpus), echo)
        try:
            _check_fits(cpus, gpus)
            self.task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1, max_retries=0)(run_in_worker)
        except BaseException:  # a local instance started for nothing stops again
            self.session.close()
            raise

    def start(self, key: Any, job: Job, config: dict, run_dir: pathlib.Path, suite: Suite, run_one=None) -> None:
        """`run_one` replaces the executor's own for this job (a final run that only evaluates)."""
        ref = self.task.remote(run_one or self.run_one, job, config, run_dir, suite, self.threads, os.getcwd())
        self.running[ref] = key

    def wait(self) -> tuple[Any, tuple[str, Any]]:
        """The next job to finish: (key, ("ok", result) or ("error", text))."""
        ready, _ = ray.wait(list(self.running), num_returns=1)
        key = self.running.pop(ready[0])
        try:
            return key, ray.get(ready[0])
        except ray.exceptions.RayError as err:  # the worker or its node died, or the task never started
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            cause = lines[-1] if lines else ""  # e.g. "ModuleNotFoundError: ..." under a RayTaskError's traceback
            return key, ("error", f"the run's Ray worker ended before reporting ({type(err).__name__}: {cause}); "
                                  "killed for memory, its node lost, or its code not importable there?")

    def close(self) -> None:
        """Disconnect; a local instance this executor started stops and its session files go."""
        self.session.close()


def _alive_nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def _check_fits(cpus: float, gpus: float) -> None:
    """A run that no node can hold would wait forever: refuse it before the first run."""
    nodes = _alive_nodes()
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        largest = max(((n.get("CPU", 0), n.get("GPU", 0)) for n in nodes), default=(0, 0))
        raise PeftlabError(f"resources: a run asks for {cpus:g} CPUs and {gpus:g} GPUs, but no Ray node has that "
                           f"much (the largest has {largest[0]:g} CPUs, {largest[1]:g} GPUs): lower the suite's "
                           "`resources` or add a node that has them")
