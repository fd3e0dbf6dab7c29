"""The bench loop: run a suite's jobs one after another, skip the finished ones, pick learning rates.

    records = run_suite(suite, results_dir, runs_dir)            # the real thing
    records = run_suite(suite, results_dir, runs_dir, run_one=fake)  # tests

Each job is an ordinary training run with its own run directory (runs_dir/<job name>/);
its record is bench/results/<suite>/<job name>.json. A record holds the hash of the run
config it came from: a rerun skips every job whose record is there with status "ok" and the
same hash, so an interrupted bench continues where it stopped, and a job whose config changed
(a different step count, a newly chosen learning rate) runs again.

`run_one(job, config, run_dir, suite) -> dict` does the work; its result is merged into the
record. The default, `execute.run_job`, trains with the training recipe; the runner calls it
in a forked child process per run (`execute.Forked`, several at once with the suite's
`workers`) or as a Ray task per run (`ray_runs.RayRuns`, `executor="ray"`), so peak RSS is
each run's own and a crash fails one record, not the bench.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import pathlib
import time
from typing import Any, Callable

from ..errors import PeftlabError
from ..io import files
from . import suite as suites
from . import tuned
from .suite import Job, Suite

SCHEMA = 1
RunOne = Callable[[Job, dict, pathlib.Path, Suite], dict]


# ---- records -----------------------------------------------------------------------------------


def record_path(results_dir: pathlib.Path, job: Job) -> pathlib.Path:
    return results_dir / f"{job.name}.json"


def write_record(path: pathlib.Path, record: dict[str, Any]) -> None:
    """Atomically: a bench killed mid-write leaves the old record or none, never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, record, sort_keys=True, default=str)


def read_record(path: pathlib.Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # treated as unfinished: the job runs again and replaces it
    return record if isinstance(record, dict) else None


def read_records(results_dir: pathlib.Path) -> list[dict[str, Any]]:
    records = [read_record(p) for p in sorted(results_dir.glob("*.json"))]
    return [r for r in records if r is not None and r.get("schema") == SCHEMA]


def finished(record: dict[str, Any] | None, config_hash: str) -> bool:
    return record is not None and record.get("status") == "ok" and record.get("config_hash") == config_hash


# ---- learning-rate selection ---------------------------------------------------------------------


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """`validation.accuracy` -> record["metrics"]["validation"]["accuracy"]."""
    node: Any = record.get("metrics", {})
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, (int, float)) else None


def _selection_score(suite: Suite, job: Job, lr: float,
                     results_dir: pathlib.Path) -> tuple[bool, tuple[float, float] | None]:
    """(has a usable record, (its validation score, its validation loss)) of the selection run at `lr`."""
    probe = Job(job.method, job.task, suite.seeds[0], "select", lr=lr)
    record = read_record(record_path(results_dir, probe))
    if record is None:
        return False, None
    if lr not in suite.selection_rates(job.method, job.task):  # an added rate: its record must be current
        config, _ = job_config(suite, probe, results_dir, pathlib.Path("runs"))
        if record.get("config_hash") != suites.config_hash(config, probe):
            return False, None
    metric = suite.selection(job.task)["metric"]
    value = metric_value(record, metric) if record.get("status") == "ok" else None
    if value is None:
        return True, None
    loss = metric_value(record, "validation.loss")
    return True, (value, math.inf if loss is None else loss)


def best_rate(scores: dict[float, tuple[float, float]], mode: str) -> float:
    """The rate of the best validation score; ties go to the lower validation loss, then the smaller rate.

    Accuracy on a few hundred validation examples ties often: every rate of a grid that is too
    low predicts the majority class, and only the loss shows which one moved furthest from it.
    """
    sign = -1.0 if mode == "max" else 1.0
    return min(scores, key=lambda lr: (sign * scores[lr][0], scores[lr][1], lr))


def grid_walk(suite: Suite, job: Job,
              results_dir: pathlib.Path) -> tuple[dict[float, tuple[float, float]], list[float], float | None]:
    """((validation score, loss) by rate, rates added past the grid, the next rate to try or None).

    The suite's grid first. While the best score sits at the largest (smallest) rate tried and
    fewer than `lr_extend` rates were added, one more rate goes past that end, a step of the
    ratio between the two rates there (2e-3, 5e-3 -> 1.25e-2).
    """
    rates, added = suite.grid(job.method), []
    while True:
        scores = {}
        for lr in rates:
            _, value = _selection_score(suite, job, lr, results_dir)
            if value is not None:
                scores[lr] = value
        if not scores or len(rates) < 2 or len(added) >= suite.lr_extend:
            return scores, added, None
        best = best_rate(scores, suite.selection(job.task)["mode"])
        if best == rates[-1]:
            step = rates[-1] * rates[-1] / rates[-2]
        elif best == rates[0]:
            step = rates[0] * rates[0] / rates[1]
        else:
            return scores, added, None
        step = float(f"{step:.3g}")
        known, _ = _selection_score(suite, job, step, results_dir)
        if not known:
            return scores, added, step
        rates, added = sorted([*rates, step]), [*added, step]


def selection_walk(suite: Suite, job: Job,
                   results_dir: pathlib.Path) -> tuple[dict[float, tuple[float, float]], list[float], float | None]:
    """The task's tuner: ((score, loss) by rate, rates past the plan's, the next rate to try or None)."""
    spec = suite.selection(job.task)
    if spec["tuner"] != "optuna":
        return grid_walk(suite, job, results_dir)
    score = functools.partial(_selection_score, suite, job, results_dir=results_dir)
    return tuned.walk(spec, suite.grid(job.method), suite.selection_rates(job.method, job.task),
                      (job.method, job.task), score)


def select_lr(suite: Suite, job: Job, results_dir: pathlib.Path) -> tuple[float, dict[str, Any]]:
    """The best learning rate for (method, task) on the validation metric, and the evidence."""
    grid, spec = suite.grid(job.method), suite.selection(job.task)
    if not suite.selection_rates(job.method, job.task):  # a one-rate grid
        return grid[0], {"grid": grid, "chosen": grid[0], "metric": None, "scores": {}}
    metric, mode = spec["metric"], spec["mode"]
    scores, added, step = selection_walk(suite, job, results_dir)
    if spec["tuner"] == "optuna" and step is not None:
        raise PeftlabError(f"{job.method} on {job.task}: {len(scores)} of {spec['trials']} Optuna trials have a "
                           f"score, lr {step:g} runs next: the final runs wait for every trial")
    if not scores:
        raise PeftlabError(f"no selection run of {job.method} on {job.task} finished with {metric}: "
                           "see their records for the error, fix it and run the bench again")
    best = best_rate(scores, mode)
    evidence = {"grid": grid, "added": added, "chosen": best, "metric": metric, "mode": mode,
                "scores": {f"{lr:g}": v for lr, (v, _) in sorted(scores.items())}}
    if spec["tuner"] == "optuna":  # a grid's evidence keeps its keys: old records compare equal
        evidence.update(tuner="optuna", trials=spec["trials"], range=list(tuned.search_range(spec, grid)))
    tied = {lr: loss for lr, (v, loss) in scores.items() if v == scores[best][0]}
    if len(tied) > 1:  # the record says how the tie was broken
        evidence["tie_broken_by"] = {"validation.loss": {f"{lr:g}": loss for lr, loss in sorted(tied.items())}}
    return best, evidence


# ---- progress ------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(index: int, total: int, job: Job, spent: list[float], remaining: int, workers: int = 1) -> str:
    """run i/N, method, task, seed, ETA: the time left from the mean time of the runs done so far."""
    eta = _duration(sum(spent) / len(spent) * remaining / workers) if spent else "?"
    what = job.method if job.implementation == "peftlab" else f"{job.method} (peft)"
    phase = f", lr {job.lr:g} (selection)" if job.phase == "select" else ""
    return f"run {index}/{total}, {what}, {job.task}, seed {job.seed}{phase}, ETA {eta}"


# ---- the loop ------------------------------------------------------------------------------------


def registered_methods() -> list[str]:
    from ..registry import methods

    return methods()


def accepted_fields(method: str) -> set[str]:
    """The config fields of a registered method (none for baselines and the reference job)."""
    import dataclasses

    from ..registry import method_class

    if method in suites.BASELINES or method == "reference":
        return set()
    return {f.name for f in dataclasses.fields(method_class(method))}


def job_config(suite: Suite, job: Job, results_dir: pathlib.Path,
               runs_dir: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run config, selection evidence) of one job; final runs take the selected rate."""
    if job.phase == "reference":
        config = {"model": suite.run.get("model"), "forgetting": suite.forgetting}
        return config, {}
    if job.phase == "select":
        lr, selection = float(job.lr), {}
    else:
        lr, selection = select_lr(suite, job, results_dir)
    config = suites.run_config(suite, job, lr, runs_dir / job.name, accepted_fields(job.method))
    return with_recipe_defaults(config), selection


def with_recipe_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """The config completed with `peftlab train`'s defaults, so the record holds every value used.

    The default method section is left out: its LoRA fields (r, alpha) must not leak into
    another method's config.
    """
    from ..recipe import config as runconfig

    defaults = runconfig.default_dict()
    defaults.pop("method", None)
    return runconfig.merge(defaults, config)


class InProcess:
    """Runs each job in this process as soon as it starts (tests, debugging)."""

    def __init__(self, run_one: RunOne):
        self.run_one = run_one
        self.finished: list[tuple[Any, tuple[str, Any]]] = []

    def start(self, key: Any, job: Job, config: dict, run_dir: pathlib.Path, suite: Suite, run_one=None) -> None:
        try:
            self.finished.append((key, ("ok", (run_one or self.run_one)(job, config, run_dir, suite))))
        except Exception as err:  # one failing method must not stop the comparison
            self.finished.append((key, ("error", f"{type(err).__name__}: {err}")))

    def wait(self) -> tuple[Any, tuple[str, Any]]:
        return self.finished.pop(0)

    def close(self) -> None:
        """Nothing to release."""


EXECUTORS = ("auto", "ray", "fork")


def make_executor(run_one: RunOne, suite: Suite, workers: int, threads: int | None, executor: str = "fork",
                  address: str | None = None, echo: Callable[[str], None] = print):
    """Where isolated runs go: "fork" (a forked child each), "ray" (a Ray task each), "auto" (ray when installed).

    address: a Ray cluster ("auto", "HOST:PORT", "ray://HOST:PORT"); None: a local Ray instance.
    """
    from . import execute

    if executor not in EXECUTORS:
        raise PeftlabError(f"executor {executor!r} is unknown: use one of {', '.join(EXECUTORS)}")
    if address and executor == "fork":
        raise PeftlabError(f"--address {address} runs on a Ray cluster: leave out --executor fork")
    has_ray = importlib.util.find_spec("ray") is not None
    if executor == "ray" or address or (executor == "auto" and has_ray):
        if not has_ray:
            raise PeftlabError("Ray runs (--executor ray, --address) need ray: `pip install 'peftlab[ray]'`, "
                               "or use --executor fork")
        from .ray_runs import RayRuns

        return RayRuns(run_one, suite, workers, threads or suite.threads, address=address, echo=echo)
    if executor == "auto":
        echo("ray is not installed: runs in forked processes on this machine (`pip install 'peftlab[ray]'` for Ray)")
    return execute.Forked(run_one, workers, threads or suite.threads)


def dependencies(suite: Suite, job: Job, jobs: list[Job]) -> list[Job]:
    """Jobs that must finish first: a final run's selection runs, and the forgetting reference."""
    needed = []
    if job.phase == "final":
        needed += [j for j in jobs if j.phase == "select" and (j.method, j.task) == (job.method, job.task)]
    if suite.forgetting is not None and job.phase != "reference":
        needed += [j for j in jobs if j.phase == "reference"]
    return needed


def run_suite(suite: Suite, results_dir: pathlib.Path, runs_dir: pathlib.Path, run_one: RunOne | None = None,
              methods: list[str] | None = None, tasks: list[str] | None = None, only: list[str] | None = None,
              seeds: list[int] | None = None, peers: bool = True,
              peer_methods: set[str] | None = None, echo: Callable[[str], None] = print, dry_run: bool = False,
              isolate: bool = True, workers: int | None = None, threads: int | None = None,
              reuse_selection: bool = True, executor: str = "fork",
              address: str | None = None) -> list[dict[str, Any]]:
    """Run (or, with dry_run, list) every job of a suite not finished yet; returns the records.

    isolate: each run in its own process (the default; `run_one` runs there), else in this
    process one after another. executor, address: where isolated runs go (`make_executor`:
    forked children, the default here; Ray tasks, `peftlab bench`'s default when ray is
    installed). workers: runs at once (default: the suite's `workers`);
    threads: torch threads per run (default: the suite's `threads`). reuse_selection: the final
    run on the first seed evaluates the selection run at the chosen rate instead of retraining it.
    """
    from . import execute

    run_one = run_one or execute.run_job
    tuned.check_installed([suite.selection(task) for task in suite.tasks])
    if peer_methods is None:
        from ..recipe import peer

        peer_methods = set(peer.METHODS)
    jobs = suites.plan(suite, registered_methods(), peer_methods, methods=methods, tasks=tasks, only=only,
                       seeds=seeds, peers=peers)
    workers = workers or suite.workers
    if isolate and not dry_run:
        runs = make_executor(run_one, suite, workers, threads, executor, address, echo)
    else:
        runs, workers = InProcess(run_one), 1
    loop = Loop(suite, jobs, results_dir, runs_dir, runs, workers, echo, dry_run,
                reuse=execute.evaluate_selected if reuse_selection else None)
    try:
        _run_all(loop)
    finally:
        runs.close()
    return [loop.records[j] for j in loop.jobs if j in loop.records]


def _run_all(loop: Loop) -> None:
    """Start every job as its dependencies finish, up to `workers` at once; log the invocation."""
    jobs, results_dir, dry_run, workers = loop.jobs, loop.results_dir, loop.dry_run, loop.workers
    started, load = time.time(), os.getloadavg()[0]
    loop.pending = list(jobs)
    loop.recorded = {j for j in jobs if (read_record(record_path(results_dir, j)) or {}).get("status") == "ok"}
    while loop.pending or loop.running:
        before = (loop.launched, len(loop.jobs))  # launches and selection runs added this round tell progress
        for job in list(loop.pending):  # in plan order: a job's dependencies come before it
            if not dry_run and len(loop.running) >= workers:
                break
            if loop.ready(job):
                loop.pending.remove(job)
                loop.launch(job)
        if loop.running:
            loop.collect()
        elif (loop.launched, len(loop.jobs)) == before:  # nothing started, nothing added: a dependency never ran
            raise PeftlabError(f"bench: jobs wait on jobs that never ran: {[j.name for j in loop.pending]}")
    if loop.spent:  # one line per invocation that ran something: how long the bench itself took
        log_invocation(results_dir, {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
                                     "wall_time_s": time.time() - started, "runs": len(loop.spent), "planned": len(jobs),
                                     "workers": workers, "load_average_start": round(load, 2),
                                     "load_average_end": round(os.getloadavg()[0], 2)})


INVOCATIONS = "invocations.jsonl"


def log_invocation(results_dir: pathlib.Path, entry: dict[str, Any]) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    with (results_dir / INVOCATIONS).open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def read_invocations(results_dir: pathlib.Path) -> list[dict[str, Any]]:
    path = results_dir / INVOCATIONS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclasses.dataclass
class Loop:
    """The state of one bench invocation: finished records, running jobs, time spent so far."""

    suite: Suite
    jobs: list[Job]
    results_dir: pathlib.Path
    runs_dir: pathlib.Path
    executor: Any  # InProcess, execute.Forked or ray_runs.RayRuns: start(key, job, config, run_dir, suite), wait()
    workers: int
    echo: Callable[[str], None]
    dry_run: bool
    records: dict[Job, dict[str, Any]] = dataclasses.field(default_factory=dict)
    running: dict[Job, tuple[dict[str, Any], float]] = dataclasses.field(default_factory=dict)
    spent: list[float] = dataclasses.field(default_factory=list)
    pending: list[Job] = dataclasses.field(default_factory=list)  # not started yet, in plan order
    recorded: set[Job] = dataclasses.field(default_factory=set)  # had an ok record at the start: likely skipped
    launched: int = 0
    reuse: Callable[..., dict] | None = None  # evaluates a selection run as a final run (None: always train)

    def ready(self, job: Job) -> bool:
        """Its selection runs (and the forgetting reference) have records, and no rate is to be added.

        A dry run waits for nothing; it only lists the tuner's trials it can name (tuner_ready).
        """
        if not self.dry_run and not all(d in self.records for d in dependencies(self.suite, job, self.jobs)):
            return False
        if job.phase != "final":
            return True
        if self.suite.selection(job.task)["tuner"] == "optuna":
            return self.tuner_ready(job)
        if not self.suite.lr_extend or self.dry_run:
            return True
        _, _, step = grid_walk(self.suite, job, self.results_dir)
        if step is None:
            return True
        self.add_selection_runs(job, [step])
        return False

    def tuner_ready(self, job: Job) -> bool:
        """Every trial so far, and the next, is a job of this bench before `job`: a resumed bench lists
        the trials it ran before (skipped) and runs the next one; the final runs wait for the last."""
        _, suggested, step = selection_walk(self.suite, job, self.results_dir)
        if self.add_selection_runs(job, [*suggested, *([] if step is None else [step])]):
            return False
        return step is None or self.dry_run  # a dry run cannot know the trials after the next one

    def add_selection_runs(self, job: Job, rates: list[float]) -> bool:
        """Selection runs at `rates` that the final `job` (and its cell's) now wait for (see dependencies);
        False when each is a job already."""
        added = [Job(job.method, job.task, self.suite.seeds[0], "select", lr=lr) for lr in rates]
        added = [a for a in added if a not in self.jobs]
        for selection in added:
            self.jobs.insert(self.jobs.index(job), selection)
            self.pending.insert(self.pending.index(job), selection)
        return bool(added)

    def settle(self, job: Job, record: dict[str, Any]) -> None:
        self.records[job] = record
        if not self.dry_run:
            write_record(record_path(self.results_dir, job), record)

    def launch(self, job: Job) -> None:
        """Skip it (finished before), fail it (cannot be configured), or start it."""
        self.launched += 1
        head = f"run {self.launched}/{len(self.jobs)}"
        try:
            config, selection = job_config(self.suite, job, self.results_dir, self.runs_dir)
        except PeftlabError as err:  # e.g. every selection run of this method failed
            if self.dry_run:
                self.echo(f"{head}, {job.name}: would run after its selection runs")
            else:
                self.echo(f"{head}, {job.name}: cannot start: {err}")
                self.settle(job, {**_identity(self.suite, job, {}, "", {}), "status": "failed", "error": str(err)})
            return
        digest = suites.config_hash(config, job)
        existing = read_record(record_path(self.results_dir, job))
        if finished(existing, digest):
            self.echo(f"{head}, {job.name}: done before, skipped")
            if selection and existing.get("selection") != selection:  # a rate added since, not chosen
                existing = {**existing, "selection": selection}
                if not self.dry_run:
                    write_record(record_path(self.results_dir, job), existing)
            self.records[job] = existing
        elif self.dry_run:
            self.echo(f"{head}, {job.name}: would run" + (" (config changed)" if existing else ""))
        else:
            # the time left counts the runs to train, not the ones a resumed bench will skip
            remaining = 1 + len(self.running) + sum(1 for j in self.pending if j not in self.recorded)
            self.echo(progress_line(self.launched, len(self.jobs), job, self.spent, remaining, self.workers))
            record = {**_identity(self.suite, job, config, digest, selection), "concurrent_runs": self.workers}
            self.running[job] = (record, time.time())
            self.executor.start(job, job, config, self.runs_dir / job.name, self.suite,
                                run_one=self.trained_before(job, selection))

    def trained_before(self, job: Job, selection: dict[str, Any]) -> RunOne | None:
        """For the final run that a selection run already trained, a `run_one` that only evaluates it.

        The final run on the suite's first seed at the chosen rate has the selection run's config
        and seed; training is deterministic, so the selection run's saved model is that final
        run's model. Its directory must still hold the trained adapter; otherwise: train again.
        """
        if job.phase != "final" or job.implementation != "peftlab" or job.seed != self.suite.seeds[0]:
            return None
        if not selection.get("scores") or self.reuse is None:  # no selection runs (a one-rate grid)
            return None
        chosen = Job(job.method, job.task, job.seed, "select", lr=selection["chosen"])
        selected = self.records.get(chosen) or read_record(record_path(self.results_dir, chosen))
        if not selected or selected.get("status") != "ok":
            return None
        run_dir = pathlib.Path(selected.get("run_dir") or self.runs_dir / chosen.name)
        if not (run_dir / "adapter").is_dir():
            return None
        return functools.partial(self.reuse, selected={**selected, "run_dir": str(run_dir)})

    def collect(self) -> None:
        """Wait for the next run to end and write its record."""
        job, (status, payload) = self.executor.wait()
        record, started = self.running.pop(job)
        if status == "ok":
            record.update(payload)
            try:
                add_forgetting_delta(record, self.suite, self.results_dir)
                record["status"] = "ok"
            except PeftlabError as err:
                record.update(status="failed", error=str(err))
        else:
            record.update(status="failed", error=payload)
            self.echo(f"  {job.name} failed: {str(payload).splitlines()[0]} (log: {self.runs_dir / job.name}.log)")
        record["bench_time_s"] = time.time() - started
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.spent.append(record["bench_time_s"])
        self.settle(job, record)


def add_forgetting_delta(record: dict[str, Any], suite: Suite, results_dir: pathlib.Path) -> None:
    """forgetting.after (this run's loss on the forgetting text) minus the base model's (the reference job)."""
    forgetting = record.get("forgetting")
    if not forgetting or suite.forgetting is None:
        return
    reference = read_record(record_path(results_dir, Job("reference", "forgetting", suite.forgetting["seed"],
                                                         "reference")))
    before = metric_value(reference, "forgetting_text.loss") if reference and reference.get("status") == "ok" else None
    if before is None:
        raise PeftlabError("the forgetting reference (the base model's loss) has no result: run the suite's "
                           "reference job first (it is the suite's first job)")
    forgetting.update(before=before, delta=forgetting["after"] - before)


def _identity(suite: Suite, job: Job, config: dict, digest: str, selection: dict) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "suite": suite.name, "run": job.name, "method": job.method, "task": job.task,
        "seed": job.seed, "phase": job.phase, "implementation": job.implementation,
        "lr": config.get("optimizer", {}).get("lr"), "lr_grid": suite.grid(job.method) if job.phase != "reference"
        else None, "selection": selection, "config": config, "config_hash": digest,
    }
