"""Bench suites: the YAML schema, its validation, and the plan of runs it expands to.

A suite file (bench/suites/<name>.yaml) says what to compare and how:

    description: one line for the report
    run:            the run config every run starts from (`peftlab train`'s schema: model,
                    data, optimizer, schedule, train, ...); `optimizer.lr` comes from `lr`
    tasks:          task names, or a mapping task -> run-config overrides for that task
    seeds:          [0, 1, 2]; final runs repeat per seed
    methods:        all | [registry names]; `all` is expanded when the bench runs, so a
                    newly registered method joins without editing the suite
    baselines:      [head-only, full, full-galore, ...]: the linear probe and full fine-tuning (full-*:
                    with that optimizer; the suite's overrides give its optimizer section)
    exclude:        {method: reason} left out of `all`; the report lists them with the reason
    method_fields:  fields given to every method that has a field of that name (r, alpha,
                    targets, total_steps, ...); a method without the field ignores it
    overrides:      {method: run-config overrides}, e.g. {vera: {method: {r: 256}}}; a key
                    METHOD@TASK applies to that task only, after the method's own
    lr:             {default: [grid], <method>: [grid]}: the learning-rate grid per method
    lr_extend:      0: when the best rate of a grid is its largest (or smallest), up to this
                    many rates are added past that end, one at a time, a step of the grid's
                    ratio at that end, until the best rate is inside (default 0)
    select:         {metric: validation.accuracy, mode: max, tuner: grid}: how the rate is chosen;
                    tuner: optuna (with trials: N, range: [lo, hi]) runs Optuna's TPE instead
                    of the grid (bench/tuned.py); a task's own `select:` under `tasks`
                    overrides these keys for that task (e.g. metric: validation.macro_f1)
    peer:           true | false | [methods]: also train the method through `peft`
    forgetting:     {examples: 256, max_length: 64}: loss change on held-out movie-dialog
                    text (causal-LM suites)
    workers:        runs at once, each in its own process (default 1)
    threads:        torch threads per run (default: torch's own choice, every core)
    resources:      {cpus: 1, gpus: 0}: what one run reserves when runs are Ray tasks (`peftlab
                    bench` with ray installed); cpus default to `threads` (else 1), gpus to 0;
                    a run's torch threads default to its cpus there

Strings "{steps}" and "{lr}" in method fields or overrides become the run's `train.steps`
and learning rate (for methods with a schedule over the run, AdaLoRA, LaMDA, LoRA-SB, or
that need the rate, LoRA-SB).

A plan is a list of `Job`s in the order they run. For each task and method: when its grid has
more than one learning rate, one selection run per rate (the suite's first seed, evaluated on
the validation split only; with tuner optuna, the grid's first `trials` rates, and the tuner
adds the rest as they are suggested); then one final run per seed with the chosen rate
(evaluated on the test split only, once); then the `peft` peer runs with the same rate and seeds. A suite
with `forgetting` starts with one reference job: the base model's loss on that text.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import pathlib
from typing import Any

import yaml

from ..errors import PeftlabError

BASELINES = ("head-only", "full", "full-galore", "full-fira", "full-frugal")  # recipe/adaptation.py
SUITE_KEYS = ("name", "description", "run", "tasks", "seeds", "methods", "baselines", "exclude", "method_fields",
              "overrides", "lr", "lr_extend", "select", "peer", "forgetting", "workers", "threads", "resources")
TEMPLATES = ("steps", "lr")  # "{steps}", "{lr}" in a suite: the run's train.steps and learning rate
FORGETTING_DEFAULTS = {"examples": 256, "max_length": 64, "batch_size": 32, "seed": 0}
SELECT_KEYS = ("metric", "mode", "tuner", "trials", "range")
TUNERS = ("grid", "optuna")  # grid: the lr grid (+ lr_extend); optuna: the grid's rates, then TPE
TUNER_ONLY = ("trials", "range")  # the keys only the optuna tuner reads


@dataclasses.dataclass
class Suite:
    name: str
    path: pathlib.Path | None
    description: str
    run: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    seeds: list[int]
    methods: Any  # "all" or a list of names
    baselines: list[str]
    exclude: dict[str, str]
    method_fields: dict[str, Any]
    overrides: dict[str, dict[str, Any]]
    lr: dict[str, list[float]]
    select: dict[str, Any]  # metric, mode (+ tuner, trials, range when given)
    peer: Any  # bool or a list of names
    forgetting: dict[str, Any] | None
    workers: int = 1  # runs at once, each in its own process
    lr_extend: int = 0  # rates a grid may grow by past the end its best rate sits at
    threads: int | None = None  # torch threads per run (None: torch's default, all cores)
    resources: dict[str, float] = dataclasses.field(default_factory=lambda: {"cpus": 1, "gpus": 0})  # per Ray task
    task_select: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # task -> its own `select`

    def grid(self, method: str) -> list[float]:
        return sorted(self.lr.get(method, self.lr["default"]))

    def selection(self, task: str) -> dict[str, Any]:
        """How a task's learning rates are chosen: metric, mode, tuner (+ trials and range for optuna)."""
        return {"tuner": "grid", **self.task_select.get(task, self.select)}

    def selection_rates(self, method: str, task: str) -> list[float]:
        """The rates the plan gives selection runs: the grid (none for a one-rate grid), or the
        tuner's first trials, the grid's first `trials` rates."""
        grid, spec = self.grid(method), self.selection(task)
        if spec["tuner"] == "optuna":
            return grid[:spec["trials"]]
        return grid if len(grid) > 1 else []

    def method_names(self, registered: list[str]) -> list[str]:
        """The methods this suite compares: baselines first, then the registered ones."""
        if self.methods == "all":
            chosen = [m for m in registered if m not in self.exclude]
        else:
            unknown = [m for m in self.methods if m not in registered and m not in BASELINES]
            if unknown:
                raise PeftlabError(f"suite {self.name}: unknown method(s) {unknown}; registered: "
                                   f"{', '.join(registered)}; baselines: {', '.join(BASELINES)}")
            chosen = list(self.methods)
        return [*self.baselines, *[m for m in chosen if m not in self.baselines]]

    def wants_peer(self, method: str) -> bool:
        return self.peer is True or (isinstance(self.peer, list) and method in self.peer)


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run (or the forgetting reference) of a suite."""

    method: str  # a registry name, a baseline, or "reference"
    task: str
    seed: int
    phase: str  # "select" (validation only), "final" (test only) or "reference"
    implementation: str = "peftlab"  # or "peft" for the peer runs
    lr: float | None = None  # set for selection runs; final runs take the selected rate

    @property
    def name(self) -> str:
        parts = [self.method, self.task, f"s{self.seed}"]
        if self.phase == "select":
            parts.append(f"lr{self.lr:g}")
        if self.implementation != "peftlab":
            parts.append(self.implementation)
        if self.phase == "select":
            parts.append("select")
        return "--".join(parts)


# ---- reading and validating a suite ----------------------------------------------------------


def suites_dir() -> pathlib.Path:
    """bench/suites of the checkout: under the working directory, else beside the sources."""
    here = pathlib.Path.cwd() / "bench" / "suites"
    if here.is_dir():
        return here
    return pathlib.Path(__file__).resolve().parents[3] / "bench" / "suites"


def find(name_or_path: str) -> pathlib.Path:
    path = pathlib.Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise PeftlabError(f"suite file {path} does not exist: check the path")
        return path
    candidate = suites_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in suites_dir().glob("*.yaml"))
    raise PeftlabError(f"no suite named {name_or_path!r}: use one of {', '.join(known) or '(none found)'} "
                       f"from {suites_dir()}, or give the path of a suite .yaml file")


def load(name_or_path: str) -> Suite:
    from ..recipe.config import SafeLoader, yaml_problem  # safe_load's reading, aliases refused

    path = find(name_or_path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=SafeLoader)
    except yaml.YAMLError as err:
        raise PeftlabError(f"suite file {path} {yaml_problem(err)}") from None
    return parse(data, name=path.stem, path=path)


def _fail(suite: str, message: str) -> None:
    raise PeftlabError(f"suite {suite}: {message}")


def _mapping(suite: str, key: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(suite, f"{key} must be a mapping, got {value!r}")
    return dict(value)


def _names(suite: str, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        _fail(suite, f"{key} must be a list of names, got {value!r}")
    return list(value)


def parse(data: Any, name: str, path: pathlib.Path | None = None) -> Suite:
    """A validated Suite from the YAML mapping; errors name the key and what is allowed."""
    if not isinstance(data, dict):
        raise PeftlabError(f"suite {name} must be a mapping of keys ({', '.join(SUITE_KEYS)})")
    name = str(data.get("name") or name)
    unknown = sorted(set(data) - set(SUITE_KEYS))
    if unknown:
        _fail(name, f"unknown key(s) {unknown}; allowed: {', '.join(SUITE_KEYS)}")
    run = _mapping(name, "run", data.get("run"))
    if "task" in run or "seed" in run or "output" in run:
        _fail(name, "run sets task, seed or output, which the bench chooses: list tasks under `tasks` "
                    "and seeds under `seeds`")
    tasks = _tasks(name, data.get("tasks"))
    own_selects = {task: overrides.pop("select") for task, overrides in tasks.items() if "select" in overrides}
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) for s in seeds):
        _fail(name, f"seeds must be a non-empty list of integers, e.g. [0, 1, 2]; got {seeds!r}")
    methods = data.get("methods", "all")
    if methods != "all":
        methods = _names(name, "methods", methods)
    baselines = _names(name, "baselines", data.get("baselines"))
    wrong = [b for b in baselines if b not in BASELINES]
    if wrong:
        _fail(name, f"baselines {wrong} are unknown; allowed: {', '.join(BASELINES)}")
    exclude = data.get("exclude") or {}
    if isinstance(exclude, list):
        exclude = {m: "" for m in exclude}
    exclude = {str(k): str(v or "") for k, v in _mapping(name, "exclude", exclude).items()}
    peer = data.get("peer", False)
    if not isinstance(peer, bool):
        peer = _names(name, "peer", peer)
    forgetting = data.get("forgetting")
    if forgetting is not None:
        forgetting = {**FORGETTING_DEFAULTS, **_mapping(name, "forgetting", forgetting)}
        extra = sorted(set(forgetting) - set(FORGETTING_DEFAULTS))
        if extra:
            _fail(name, f"forgetting allows {', '.join(FORGETTING_DEFAULTS)}; unknown: {extra}")
    lr_extend = data.get("lr_extend", 0)
    if not _is_int(lr_extend) or lr_extend < 0:
        _fail(name, f"lr_extend must be an integer >= 0 (rates a grid may grow by), got {lr_extend!r}")
    workers, threads = data.get("workers", 1), data.get("threads")
    if not _is_int(workers) or workers < 1:
        _fail(name, f"workers must be a positive integer (runs at once), got {workers!r}")
    if threads is not None and (not _is_int(threads) or threads < 1):
        _fail(name, f"threads must be a positive integer (torch threads per run) or null, got {threads!r}")
    lr = _lr_grids(name, data.get("lr"))
    select = _select(name, "select", _mapping(name, "select", data.get("select")), lr)
    task_select = {task: _select(name, f"tasks.{task}.select", _task_select(name, task, own, data.get("select")), lr)
                   for task, own in own_selects.items()}
    return Suite(name=name, path=path, description=str(data.get("description", "")).strip(), run=run,
                 tasks=tasks, seeds=list(seeds), methods=methods, baselines=baselines, exclude=exclude,
                 method_fields=_mapping(name, "method_fields", data.get("method_fields")),
                 overrides=_overrides(name, data.get("overrides"), tasks), lr=lr, select=select, peer=peer,
                 forgetting=forgetting, workers=workers, threads=threads, lr_extend=lr_extend,
                 resources=_resources(name, data.get("resources"), threads), task_select=task_select)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _resources(suite: str, value: Any, threads: int | None) -> dict[str, float]:
    """`resources`: the CPUs and GPUs one run reserves as a Ray task (fractions allowed, as Ray allows)."""
    resources = {"cpus": threads or 1, "gpus": 0, **_mapping(suite, "resources", value)}
    extra = sorted(set(resources) - {"cpus", "gpus"})
    if extra:
        _fail(suite, f"resources allows cpus and gpus; unknown: {extra}")
    for key, least in (("cpus", "> 0"), ("gpus", ">= 0")):
        amount = resources[key]
        if not isinstance(amount, (int, float)) or isinstance(amount, bool) or not (
                amount > 0 if key == "cpus" else amount >= 0):
            _fail(suite, f"resources.{key} must be a number {least} (what one run reserves), got {amount!r}")
    return resources


def _tasks(suite: str, tasks: Any) -> dict[str, dict]:
    """`tasks`: a list of task names, or task -> run overrides."""
    if isinstance(tasks, list) and all(isinstance(t, str) for t in tasks):
        tasks = {t: {} for t in tasks}
    if not isinstance(tasks, dict) or not tasks:
        _fail(suite, f"tasks must be a non-empty list of task names (or task -> overrides), got {tasks!r}")
    return {t: _mapping(suite, f"tasks.{t}", o) for t, o in tasks.items()}


def _lr_grids(suite: str, value: Any) -> dict[str, list[float]]:
    """`lr`: method (or `default`) -> a grid of positive rates."""
    lr = _mapping(suite, "lr", value)
    if "default" not in lr:
        _fail(suite, "lr needs a `default` grid, e.g. lr: {default: [1.0e-4, 5.0e-4]}")
    for key, grid in lr.items():
        if not isinstance(grid, list) or not grid or not all(isinstance(x, (int, float)) and x > 0 for x in grid):
            _fail(suite, f"lr.{key} must be a non-empty list of positive learning rates, got {grid!r}")
    return {k: [float(x) for x in v] for k, v in lr.items()}


def _task_select(suite: str, task: str, own: Any, shared: Any) -> dict[str, Any]:
    """A task's `select` over the suite's: a task naming its own tuner keeps none of the other tuner's keys."""
    own, shared = _mapping(suite, f"tasks.{task}.select", own), _mapping(suite, "select", shared)
    if "tuner" in own:
        shared = {k: v for k, v in shared.items() if k not in ("tuner", *TUNER_ONLY)}
    return {**shared, **own}


def _select(suite: str, where: str, given: dict[str, Any], grids: dict[str, list[float]]) -> dict[str, Any]:
    """`select`: the validation metric the rate is chosen on, whether higher or lower wins, and the tuner.

    Only the keys given are kept besides metric and mode, so a grid suite's `select` reads as before.
    """
    unknown = sorted(set(given) - set(SELECT_KEYS))
    if unknown:
        _fail(suite, f"{where} has unknown key(s) {unknown}; allowed: {', '.join(SELECT_KEYS)}")
    select = {"metric": "validation.accuracy", "mode": "max", **given}
    if select["mode"] not in ("max", "min"):
        _fail(suite, f"{where}.mode must be max or min, got {select['mode']!r}")
    if not isinstance(select["metric"], str) or "." not in select["metric"]:
        _fail(suite, f"{where}.metric must look like validation.accuracy or validation.loss, got {select['metric']!r}")
    _check_tuner(suite, where, select, grids)
    if "range" in select:
        select["range"] = [float(x) for x in select["range"]]
    return select


def _check_tuner(suite: str, where: str, select: dict[str, Any], grids: dict[str, list[float]]) -> None:
    """tuner grid (the default) takes no tuner keys; optuna needs `trials` and may narrow `range`."""
    tuner = select.get("tuner", "grid")
    if tuner not in TUNERS:
        _fail(suite, f"{where}.tuner {tuner!r} is unknown: use grid (the lr grid, the default) or optuna "
                     "(Optuna's TPE, from the grid's rates)")
    if tuner == "grid":
        given = [k for k in TUNER_ONLY if k in select]
        if given:
            _fail(suite, f"{where}.{given[0]} applies to tuner: optuna only: add tuner: optuna or remove it")
        return
    trials = select.get("trials")
    if not _is_int(trials) or trials < 1:
        _fail(suite, f"{where}.trials must be an integer >= 1 with tuner: optuna (selection runs per method "
                     f"and task, e.g. 8), got {trials!r}")
    if "range" in select:
        _check_range(suite, where, select["range"], grids)


def _check_range(suite: str, where: str, bounds: Any, grids: dict[str, list[float]]) -> None:
    """`range: [low, high]`: positive, increasing, and holding every grid rate (the grid's rates are trials)."""
    numbers = isinstance(bounds, list) and len(bounds) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in bounds)
    if not numbers or not 0 < bounds[0] < bounds[1]:
        _fail(suite, f"{where}.range must be [low, high] with 0 < low < high, e.g. [1.0e-5, 1.0e-2]; got {bounds!r}")
    for key, grid in grids.items():
        outside = [lr for lr in grid if not bounds[0] <= lr <= bounds[1]]
        if outside:
            _fail(suite, f"{where}.range {bounds} leaves out lr.{key}'s {outside[0]:g}: widen it to hold every "
                         "grid rate (they are the first trials), or leave it out for [min(grid)/4, max(grid)*4]")


def _overrides(suite: str, value: Any, tasks: dict[str, dict]) -> dict[str, dict]:
    """`overrides`: METHOD or METHOD@TASK -> config sections merged into that method's runs."""
    overrides = _mapping(suite, "overrides", value)
    for method, values in overrides.items():
        _mapping(suite, f"overrides.{method}", values)
        task = method.partition("@")[2]
        if "@" in method and task not in tasks:
            _fail(suite, f"overrides.{method}: {task!r} is not one of the suite's tasks {list(tasks)}; "
                         "write METHOD@TASK with a task listed under `tasks`")
    return overrides


# ---- the plan ----------------------------------------------------------------------------------


def _narrowed(suite: Suite, option: str, available: list, wanted: list | None, shown: str) -> list:
    """`available` kept to `wanted`, in the suite's order (all of it when `wanted` is empty).

    A wanted item the suite lacks is refused, naming what it has (`shown`).
    """
    if not wanted:
        return list(available)
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise PeftlabError(f"{option} {missing} are not in suite {suite.name}; it has: {shown}")
    return [item for item in available if item in wanted]


def plan(suite: Suite, registered: list[str], peer_methods: set[str], methods: list[str] | None = None,
         tasks: list[str] | None = None, only: list[str] | None = None, seeds: list[int] | None = None,
         peers: bool = True) -> list[Job]:
    """Every job of the suite, in running order, narrowed by the filters.

    `peer_methods`: the methods that have a `peft` counterpart. Filters: `methods`, `tasks` and
    `seeds` keep those (selection runs use the suite's first seed whatever `seeds` says);
    `only` keeps jobs whose name starts with any of the given strings; `peers=False` leaves the
    `peft` runs out. A final run always keeps the selection runs that decide its learning rate.
    """
    all_methods = suite.method_names(registered)
    chosen = _narrowed(suite, "--methods", all_methods, methods, ", ".join(all_methods))
    task_names = _narrowed(suite, "--tasks", list(suite.tasks), tasks, ", ".join(suite.tasks))
    _narrowed(suite, "--seeds", suite.seeds, seeds, str(suite.seeds))  # checked only: seeds filter below

    jobs: list[Job] = []
    if suite.forgetting is not None:
        jobs.append(Job("reference", "forgetting", suite.forgetting["seed"], "reference"))
    for task in task_names:
        for method in chosen:
            cell = [Job(method, task, suite.seeds[0], "select", lr=lr) for lr in suite.selection_rates(method, task)]
            cell += [Job(method, task, seed, "final") for seed in suite.seeds]
            if suite.wants_peer(method) and method in peer_methods:
                cell += [Job(method, task, seed, "final", implementation="peft") for seed in suite.seeds]
            wanted = [j for j in cell if j.phase == "final"
                      and (not only or any(j.name.startswith(o) for o in only))
                      and (not seeds or j.seed in seeds) and (peers or j.implementation == "peftlab")]
            if only:  # --only may name a selection run itself
                wanted += [j for j in cell if j.phase == "select" and any(j.name.startswith(o) for o in only)]
            needs_selection = any(j.phase == "final" for j in wanted)
            jobs += [j for j in cell if j in wanted or (j.phase == "select" and needs_selection)]
    if jobs and jobs[0].phase == "reference" and len(jobs) == 1:
        return []  # the reference only serves other runs' forgetting
    return jobs


# ---- the run config of one job -----------------------------------------------------------------


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fill_templates(value: Any, values: dict[str, Any], suite: str) -> Any:
    """"{steps}" -> the run's train.steps, "{lr}" -> its learning rate, anywhere in the config."""
    if isinstance(value, dict):
        return {k: _fill_templates(v, values, suite) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_templates(v, values, suite) for v in value]
    if isinstance(value, str) and value.startswith("{") and value.endswith("}") and value[1:-1] in TEMPLATES:
        filled = values[value[1:-1]]
        if filled is None:
            _fail(suite, f"a field says {value!r} but the run has no train.steps: set run.train.steps")
        return filled
    return value


def method_section(suite: Suite, method: str, accepted_fields: set[str]) -> dict[str, Any]:
    """{name, fields}: the suite's shared method fields that this method has."""
    shared = {k: v for k, v in suite.method_fields.items() if k in accepted_fields}
    return {"name": method, **copy.deepcopy(shared)}


def run_config(suite: Suite, job: Job, lr: float, output: pathlib.Path,
               accepted_fields: set[str]) -> dict[str, Any]:
    """The run config (as a plain mapping, before `peftlab train` validates it) of one job."""
    config = copy.deepcopy(suite.run)
    config = deep_merge(config, suite.tasks[job.task])
    config["task"] = job.task
    config["method"] = method_section(suite, job.method, accepted_fields)
    config = deep_merge(config, suite.overrides.get(job.method, {}))
    config = deep_merge(config, suite.overrides.get(f"{job.method}@{job.task}", {}))  # one task's, last
    config.setdefault("optimizer", {})
    config["optimizer"] = {**config["optimizer"], "lr": lr}
    config["seed"] = job.seed
    config["output"] = str(output)
    values = {"steps": config.get("train", {}).get("steps"), "lr": lr}
    return _fill_templates(config, values, suite.name)


def config_hash(config: dict[str, Any], job: Job) -> str:
    """Identifies what a result was computed from (everything but where its files went)."""
    values = {k: v for k, v in config.items() if k != "output"}
    values = {**values, "_job": [job.phase, job.implementation]}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
