"""Hyperparameter search over one run config: `peftlab tune CONFIG --space SPACE --trials N`.

Optuna's TPE sampler (through Ray Tune's OptunaSearch) proposes each trial's values from the
declared space; Ray Tune runs the trials, on a local Ray instance or on a cluster
(`--address`); with `--scheduler asha` the asynchronous successive-halving scheduler stops a
trial whose validation score falls behind the others' at a rung. A rung step is one
validation, every `train.eval_every` steps (default: an eighth of `train.steps`).

Each trial is an ordinary `peftlab train` run with its own run directory (config.yaml,
metrics.jsonl, summary.json, adapter/), so a trial can be evaluated, merged or resumed like
any run.

The space file names any run-config key as `--set` writes it:

    metric: validation.accuracy        # or validation.loss, validation.macro_f1, ...
    mode: max                          # max or min
    parameters:
      optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}
      method.r: {choice: [4, 8, 16, 32]}
      method.alpha: {int: [4, 64]}
      method.dropout: {uniform: [0.0, 0.2]}
      schedule.warmup_ratio: {uniform: [0.0, 0.1]}

The output folder (`--out`, default runs/tune-<time>):

    trials/<trial>/   each trial's run directory
    tune.json         every trial: its values, status (finished, stopped by the scheduler,
                      failed), its last validation score and its run directory (none for a
                      trial stopped before its first checkpoint: like any run stopped that
                      early, it leaves nothing)
    best.yaml         the best finished trial's run config, without `output`:
                      `peftlab train best.yaml` trains it again
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import time
from typing import Any

import yaml

from ..errors import PeftlabError
from ..io import files
from ..recipe import config as run_config

DISTRIBUTIONS = ("uniform", "log_uniform", "int", "log_int", "choice")
SCHEDULERS = ("asha", "fifo")


# ---- the space -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Space:
    """What to search: {config key: (distribution, arguments)}, and the score to optimise."""

    parameters: dict[str, tuple[str, list]]
    metric: str = "validation.accuracy"
    mode: str = "max"

    def corners(self) -> list[dict[str, Any]]:
        """Values at the ends of every range (every choice): each must make a valid run config."""
        low = {key: args[0] for key, (_, args) in self.parameters.items()}
        high = {key: args[-1] for key, (_, args) in self.parameters.items()}
        choices = [{key: value} for key, (kind, args) in self.parameters.items() if kind == "choice" for value in args]
        return [low, high, *choices]


def read_space(path: str | pathlib.Path) -> Space:
    """The space file, checked: each parameter one distribution with valid arguments."""
    data = run_config.read_yaml(path)
    unknown = set(data) - {"metric", "mode", "parameters"}
    if unknown:
        raise PeftlabError(f"{path}: unknown key(s) {sorted(unknown)}; a space file has metric, mode and parameters")
    parameters = data.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise PeftlabError(f"{path}: `parameters` must map config keys to distributions, e.g. "
                           "optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}")
    space = Space({key: _distribution(path, key, spec) for key, spec in parameters.items()},
                  metric=str(data.get("metric", Space.metric)), mode=str(data.get("mode", Space.mode)))
    if space.mode not in ("max", "min"):
        raise PeftlabError(f"{path}: mode is {space.mode!r}; use max or min")
    if not space.metric.startswith("validation."):
        raise PeftlabError(f"{path}: metric {space.metric!r} must be a validation metric (validation.accuracy, "
                           "validation.loss, ...): trials never look at the test split")
    return space


def _distribution(path, key: str, spec: Any) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise PeftlabError(f"{path}: parameter {key} must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, "
                           f"e.g. {{log_uniform: [1.0e-4, 1.0e-2]}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise PeftlabError(f"{path}: parameter {key}: {kind} takes a list, e.g. [low, high]")
    if kind == "choice":
        return kind, args
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)
    if len(args) != 2 or not numbers or not args[0] < args[1]:
        raise PeftlabError(f"{path}: parameter {key}: {kind} takes [low, high] with low < high; got {args!r}")
    if kind.startswith("log") and args[0] <= 0:
        raise PeftlabError(f"{path}: parameter {key}: {kind} needs low > 0; got {args[0]!r}")
    if kind.endswith("int") and not all(isinstance(a, int) for a in args):
        raise PeftlabError(f"{path}: parameter {key}: {kind} takes integer bounds; got {args!r}")
    return kind, args


def tune_space(space: Space) -> dict[str, Any]:
    """The space as Ray Tune's search space (int ranges include their upper bound)."""
    from ray import tune

    made = {"uniform": lambda a: tune.uniform(a[0], a[1]), "log_uniform": lambda a: tune.loguniform(a[0], a[1]),
            "int": lambda a: tune.randint(a[0], a[1] + 1), "log_int": lambda a: tune.lograndint(a[0], a[1] + 1),
            "choice": tune.choice}
    return {key: made[kind](args) for key, (kind, args) in space.parameters.items()}


# ---- one trial -------------------------------------------------------------------------------------


def trial_config(base: dict[str, Any], values: dict[str, Any], output: pathlib.Path | None) -> dict[str, Any]:
    """The base config with the trial's values (dotted keys, as --set) and its run directory."""
    data = base
    for key, value in values.items():
        data = run_config.merge(data, run_config.parse_override(f"{key}={_yaml_scalar(value)}"))
    return run_config.merge(data, {"output": str(output)}) if output is not None else data


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def validation_scores(metrics: dict[str, float]) -> dict[str, float]:
    """An evaluation's metrics as `validation.<name>`: the loop's evaluations during training log
    `eval_<name>`, the final one `validation_<name>`; test metrics are left out."""
    out = {}
    for key, value in metrics.items():
        for prefix in ("eval_", "validation_"):
            if key.startswith(prefix) and not key.endswith(("_runtime", "_per_second")):
                out["validation." + key[len(prefix):]] = float(value)
    return out


def run_trial(values: dict[str, Any], *, base: dict[str, Any], trials_dir: str) -> None:
    """One Tune trial: train the config with the trial's values, reporting each validation."""
    from ray import tune
    from transformers import TrainerCallback

    from ..recipe import trainer

    class ReportValidation(TrainerCallback):
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            scores = validation_scores(metrics or {})
            if scores:
                tune.report({**scores, "step": state.global_step})

    run_dir = pathlib.Path(trials_dir) / tune.get_context().get_trial_id()
    run = run_config.validate(trial_config(base, values, run_dir))
    summary = trainer.train(run, echo=lambda *_: None, hooks=trainer.Hooks(splits=("validation",),
                                                                            callbacks=(ReportValidation(),)))
    final = {f"validation.{k}": v for k, v in summary["metrics"]["validation"].items()}
    tune.report({**final, "step": summary["steps"], "finished": True})


# ---- the search ------------------------------------------------------------------------------------


def with_rungs(base: dict[str, Any], scheduler: str) -> dict[str, Any]:
    """ASHA compares trials at validations: give the run some if its config has none."""
    train = base.get("train", {})
    if scheduler != "asha" or train.get("eval_every"):
        return base
    steps = train.get("steps")
    if not steps:
        raise PeftlabError("--scheduler asha compares trials at each validation: set train.eval_every "
                           "(e.g. --set train.eval_every=50), or train.steps so that it can default to steps/8")
    return run_config.merge(base, {"train": {"eval_every": max(1, steps // 8)}})


def search(base: dict[str, Any], space: Space, out: pathlib.Path, trials: int, scheduler: str = "asha",
           address: str | None = None, cpus_per_trial: float = 1, concurrent: int | None = None, seed: int = 0,
           echo=print) -> dict[str, Any]:
    """Run the search; writes tune.json and best.yaml under `out` and returns tune.json's content."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from .ray_runs import ray_session

    base = with_rungs(base, scheduler)
    for corner in space.corners():  # a bad key or value fails here, before any trial
        run_config.validate(trial_config(base, corner, None))
    out.mkdir(parents=True, exist_ok=True)
    trials_dir = (out / "trials").resolve()
    metric, mode = space.metric, space.mode
    rungs = (ASHAScheduler(metric=metric, mode=mode, max_t=10_000, grace_period=1, reduction_factor=2)
             if scheduler == "asha" else FIFOScheduler())
    with ray_session(address, cpus=math.ceil(cpus_per_trial * (concurrent or 1)), echo=echo):
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, base=base, trials_dir=str(trials_dir)),
                                {"cpu": cpus_per_trial}),
            param_space=tune_space(space),
            tune_config=tune.TuneConfig(search_alg=OptunaSearch(metric=metric, mode=mode, seed=seed),
                                        scheduler=rungs, num_samples=trials, max_concurrent_trials=concurrent,
                                        reuse_actors=False),
            run_config=tune.RunConfig(name="ray", storage_path=str(out.resolve()), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0)))
        results = tuner.fit()
        summary = _summarise(results, space, trials_dir)
    return _write_results(out, summary, base, space)


def _summarise(results, space: Space, trials_dir: pathlib.Path) -> dict[str, Any]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or (result.path and pathlib.Path(result.path).name)
        status = "failed" if result.error else "finished" if metrics.get("finished") else "stopped"
        rows.append({"trial": trial_id, "values": {k: result.config[k] for k in space.parameters},
                     "status": status, "score": metrics.get(space.metric), "steps": metrics.get("step"),
                     # a trial stopped before its first checkpoint leaves no run directory (the recipe's rule)
                     "run_dir": str(trials_dir / str(trial_id)) if (trials_dir / str(trial_id)).is_dir() else None,
                     "error": str(result.error).splitlines()[0] if result.error else None})
    rows.sort(key=lambda row: row["trial"] or "")
    return {"metric": space.metric, "mode": space.mode, "trials": rows}


def best_trial(summary: dict[str, Any]) -> dict[str, Any] | None:
    finished = [row for row in summary["trials"] if row["status"] == "finished" and row["score"] is not None]
    if not finished:
        return None
    sign = 1 if summary["mode"] == "max" else -1
    return max(finished, key=lambda row: sign * row["score"])


def _write_results(out: pathlib.Path, summary: dict[str, Any], base: dict[str, Any], space: Space) -> dict[str, Any]:
    best = best_trial(summary)
    summary = {**summary, "best": best["trial"] if best else None, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    files.write_json(out / "tune.json", summary, sort_keys=True)
    if best is not None:
        config = trial_config(base, best["values"], None)
        config.pop("output", None)
        header = (f"# the best trial of `peftlab tune` ({space.metric} = {best['score']:.4g}, {space.mode}): "
                  f"{best['trial']}\n# train it again: peftlab train best.yaml --output DIR\n")
        files.write_text(out / "best.yaml", header + yaml.safe_dump(config, sort_keys=False))
    return summary


# ---- the command line ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML run config (as for peftlab train)")
    parser.add_argument("--space", required=True, help="the search space: a YAML file (see docs/cli.md)")
    parser.add_argument("--trials", type=int, required=True, help="how many trials to run")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="asha",
                        help="asha: stop trials that fall behind at a validation (default); fifo: run all to the end")
    parser.add_argument("--address", help="an existing Ray cluster (auto, HOST:PORT or ray://HOST:PORT); "
                                          "default: a local Ray instance")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one key of the base config (repeatable)")
    parser.add_argument("--out", help="the output folder (default: runs/tune-<time>)")
    parser.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs each trial reserves (default 1)")
    parser.add_argument("--concurrent", type=int, help="trials at once (default: as many as the CPUs allow)")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")


def run_from_args(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise PeftlabError(f"--trials {args.trials}: give at least 1")
    space = read_space(args.space)
    base = run_config.build(args.config, args.overrides).to_dict()
    out = pathlib.Path(args.out or f"runs/tune-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = search(base, space, out, args.trials, scheduler=args.scheduler, address=args.address,
                     cpus_per_trial=args.cpus_per_trial, concurrent=args.concurrent, seed=args.seed)
    best = best_trial(summary)
    for row in summary["trials"]:
        score = "-" if row["score"] is None else f"{row['score']:.4f}"
        print(f"{row['trial']}  {row['status']:<8}  {space.metric} {score}  {row['values']}")
    if best is None:
        raise PeftlabError(f"no trial finished (see {out / 'tune.json'}): check the trials' run directories")
    print(f"best: {best['trial']} ({space.metric} {best['score']:.4f}); train it again: "
          f"peftlab train {out / 'best.yaml'}")
    return 0
