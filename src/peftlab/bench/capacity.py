"""Capacity (Shwartz-Ziv, Goldblum, Bansal, Bruss, LeCun & Wilson 2024, "Just how flexible are
neural networks in practice?", arXiv 2406.11463): the effective model complexity (EMC) of a
method at a budget is the largest number of training examples n it fits to 100% training
accuracy. Found here by doubling n, then bisection (bench/probes.py), once with the true labels
and once with random labels; the gap between the two is the paper's predictor of
generalisation (a method that fits far more true than random labels generalises better).

Every probe is an ordinary recipe run on n examples of the task (data.limit = n, the whole
sample as the training split) with the user's method, model and training settings (`--set`;
the budget is train.epochs or train.steps: fix it for a comparison). Random labels are the
recipe's uniform label noise at rate (K - 1) / K for K classes: each example's label is then
uniform over the K classes, independent of its text. The training accuracy is measured after
training on the labels trained on.

    peftlab analyze capacity --method lora --set method.r=8 --task movie-sentiment [--output DIR]

writes DIR/capacity.json and DIR/capacity.png (training accuracy against n for both labelings),
with the probe runs in DIR/<labels>-n<N>/.
"""
from __future__ import annotations

import pathlib
from typing import Any

from .probes import largest_true, run_probe
from ..errors import PeftlabError
from ..io import files
from ..recipe import config, data, trainer
from ..recipe.metrics import score

LABELINGS = ("true", "random")


def _training_accuracy(run) -> Any:
    """Hooks.trained: the accuracy on the training rows, with the labels the run trained on."""

    def measure(model, tokenizer) -> dict[str, float]:
        task = data.load(run.task, run.data, run.seed)
        rows = data.split(task.rows, tuple(run.data.split), run.seed)[0]
        rows, _ = data.label_noise(rows, run.noise, len(task.label_names), run.seed)
        result = score(model.eval(), tokenizer, rows, task.kind, run.data.max_length, run.train.eval_batch_size,
                       progress=False)
        return {"train_accuracy": result["accuracy"]}

    return measure


def probe_overrides(overrides: list[str], n: int, labels: str, classes: int) -> list[str]:
    """The run of one probe: n examples, all of them for training; random labels as uniform noise."""
    extra = [f"data.limit={n}", "data.split=[1.0, 0.0, 0.0]"]
    if labels == "random":
        extra += ["noise.kind=uniform", f"noise.rate={(classes - 1) / classes!r}"]
    return [*overrides, *extra]


def capacity(overrides: list[str], out: pathlib.Path, start: int = 8, limit: int = 4096,
             fit_accuracy: float = 1.0, resolution: float = 0.05, labelings=LABELINGS, echo=print) -> dict:
    """Runs the search for each labeling; writes out/capacity.json and out/capacity.png; returns the report."""
    run = config.build(None, overrides)  # every bad key or value fails here, before any run
    if run.kind != "classification":
        raise PeftlabError(f"capacity counts examples fitted to 100% training accuracy: task {run.task!r} is "
                           f"{run.kind}; choose a classification task")
    if not 0 < fit_accuracy <= 1:
        raise PeftlabError(f"--fit-accuracy must be in (0, 1], got {fit_accuracy}")
    task = data.load(run.task, run.data, run.seed)
    classes, limit = len(task.label_names), min(limit, len(task.rows))
    report: dict[str, Any] = {"overrides": overrides, "fit_accuracy": fit_accuracy, "classes": classes}
    for labels in labelings:
        accuracy: dict[int, float] = {}

        def fits(n: int) -> bool:
            probe = probe_overrides(overrides, n, labels, classes)
            built = config.build(None, probe)
            summary = run_probe(probe, out / f"{labels}-n{n:05d}",
                                trainer.Hooks(splits=(), trained=_training_accuracy(built)))
            accuracy[n] = summary["extra"]["train_accuracy"]
            echo(f"  {labels} labels, n={n}: training accuracy {accuracy[n]:.4f}")
            return accuracy[n] >= fit_accuracy

        emc, _ = largest_true(fits, min(start, limit), limit, resolution)
        report[labels] = {"emc": emc, "train_accuracy": {str(n): a for n, a in sorted(accuracy.items())}}
    if "true" in report and "random" in report:
        report["gap"] = report["true"]["emc"] - report["random"]["emc"]
    _write(out, report)
    echo("capacity: " + ", ".join(f"{labels} labels EMC {report[labels]['emc']}" for labels in labelings)
         + (f", gap {report['gap']}" if "gap" in report else "") + f"; written to {out}")
    return report


def _write(out: pathlib.Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..recipe.analyze import png

    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / "capacity.json", report)
    figure, ax = plt.subplots(figsize=(6, 4))
    for labels in LABELINGS:
        if labels in report:
            points = sorted((int(n), a) for n, a in report[labels]["train_accuracy"].items())
            ax.plot(*zip(*points), marker="o", label=f"{labels} labels (EMC {report[labels]['emc']})")
    ax.axhline(report["fit_accuracy"], color="0.6", lw=0.8, ls="--")
    ax.set_xscale("log"), ax.set_xlabel("training examples n (log)"), ax.set_ylabel("training accuracy")
    ax.legend()
    files.write_bytes(out / "capacity.png", png(figure))
