"""Robust losses under label noise: LoRA on MiniLM-L6, training labels corrupted, clean test split.

The grid: movie sentiment (2 classes) and TREC-6 (6 classes) x 0%, 20%, 40% uniform noise (each
changed label moves to another class at random; validation and test stay clean) x five losses x
three seeds. Each cell is one ordinary `peftlab train` run, the standard suite's LoRA recipe
(r 8, alpha 16 on query/value; AdamW at 2e-3, the rate the standard suite selected for LoRA on
movie sentiment, the same for every loss; linear schedule, 6% warmup; batch 32; about one epoch:
250 / 135 steps, times --epochs). The noise draw follows the run's seed.

    losses  ce        cross entropy
            ce_ls     cross entropy, label smoothing 0.1
            gce       generalized cross entropy, q = 0.7
            ldr_kl    LDR-KL at the official defaults (margin 0.1, lambda 10)
            aldr_kl   ALDR-KL at the official defaults (margin 0.1, lambda0 10, alpha 2)
    and, on request (--losses), ldr_kl_lam1 and aldr_kl_lam1: the same at lambda (lambda0) 1

Usage (the whole grid: 90 runs, about 3.5 CPU-hours at one thread per run; --workers 2 halves
the wall time on two cores):

    python bench/label_noise.py [--workers 2] [--tasks ...] [--rates 0,0.2,0.4] [--losses ...]
                                [--seeds 0,1,2] [--epochs 1] [--steps N] [--runs DIR] [--out DIR]

Finished runs (a summary.json in their folder) are skipped, so an interrupted bench continues.
Writes, under --out (bench/results/label_noise): results.json (one record per run), report.md
(test accuracy, mean +- std over seeds, per task, loss and noise rate) and accuracy_vs_noise.png.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASK_STEPS = {"movie-sentiment": 250, "trec-coarse": 135}  # one epoch of the standard suite's split
LOSSES = {
    "ce": {"name": "cross_entropy"},
    "ce_ls": {"name": "cross_entropy", "label_smoothing": 0.1},
    "gce": {"name": "gce", "q": 0.7},
    "ldr_kl": {"name": "ldr_kl"},
    "aldr_kl": {"name": "aldr_kl"},
    # not in the default grid: the LDR losses at lambda 1 instead of the official default 10 (the
    # paper tunes lambda per dataset); at lambda0 = 10, ALDR-KL's lambdas cannot move (report.md)
    "ldr_kl_lam1": {"name": "ldr_kl", "lam": 1.0},
    "aldr_kl_lam1": {"name": "aldr_kl", "lambda0": 1.0},
}
DEFAULT_LOSSES = ("ce", "ce_ls", "gce", "ldr_kl", "aldr_kl")
RECIPE = {  # the standard suite's run section, with LoRA at its selected rate
    "model": "minilm-l6", "data.max_length": 64, "data.split": [0.8, 0.1, 0.1],
    "method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]},
    "optimizer": {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.0},
    "schedule": {"name": "linear", "warmup_ratio": 0.06},
    "train.batch_size": 32, "train.eval_batch_size": 128, "train.save_every": 1000000, "train.log_every": 25,
    "train.progress": False, "train.group_by_length": True,
}


def cell_name(task: str, rate: float, loss: str, seed: int) -> str:
    return f"{task}--noise{rate:g}--{loss}--s{seed}"


def overrides(task: str, rate: float, loss: str, seed: int, steps: int, output: pathlib.Path) -> list[str]:
    """--set values of one run: the recipe, the task, the loss, the noise and the seed."""
    values = {**RECIPE, "task": task, "loss": LOSSES[loss], "seed": seed, "train.steps": steps,
              "output": str(output)}
    if rate > 0:
        values["noise"] = {"kind": "uniform", "rate": rate}  # seed: the run's
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def run_cell(cell: dict, runs: pathlib.Path, threads: int) -> dict:
    """Train one cell in its own process (unless it finished before); its record."""
    folder = runs / cell["name"]
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        argv = [sys.executable, "-m", "peftlab", "train", "--overwrite"]
        for value in overrides(cell["task"], cell["rate"], cell["loss"], cell["seed"], cell["steps"], folder):
            argv += ["--set", value]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        runs.mkdir(parents=True, exist_ok=True)
        with (runs / f"{cell['name']}.log").open("w") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if done.returncode != 0:
            return {**cell, "status": "error", "log": str(runs / f"{cell['name']}.log")}
    summary = json.loads(summary_file.read_text())
    task_record = json.loads((folder / "task.json").read_text())
    test, validation = summary["metrics"]["test"], summary["metrics"].get("validation", {})
    return {**cell, "status": "ok", "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "validation_accuracy": validation.get("accuracy"), "train_time_s": summary["train_time_s"],
            "flipped": len(task_record.get("noise", {}).get("flipped", [])), "run": str(folder)}


def grid(args: argparse.Namespace) -> list[dict]:
    cells = []
    for task in args.tasks:
        steps = args.steps or round(TASK_STEPS[task] * args.epochs)
        for rate in args.rates:
            for loss in args.losses:
                for seed in args.seeds:
                    cells.append({"name": cell_name(task, rate, loss, seed), "task": task, "rate": rate,
                                  "loss": loss, "seed": seed, "steps": steps})
    return cells


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def report(records: list[dict], rates: list[float], losses: list[str]) -> str:
    """report.md: per task, test accuracy (%) mean ± std over seeds, one row per loss."""
    lines = ["# Robust losses under label noise", "",
             "LoRA (r 8) on MiniLM-L6, uniform noise on the training labels only; test accuracy (%) on the "
             "clean test split, mean ± std over seeds. `bench/label_noise.py` made this page.", ""]
    for task in dict.fromkeys(r["task"] for r in records):
        lines += [f"## {task}", "", "| loss | " + " | ".join(f"{r:.0%} noise" for r in rates) + " |",
                  "|---|" + "---|" * len(rates)]
        for loss in losses:
            cells = [mean_std([r["test_accuracy"] for r in records if r["task"] == task and r["loss"] == loss
                               and r["rate"] == rate and r["status"] == "ok"]) for rate in rates]
            lines.append(f"| {loss} | " + " | ".join(cells) + " |")
        lines.append("")
    failed = [r["name"] for r in records if r["status"] != "ok"]
    if failed:
        lines += [f"Failed runs (see their logs): {', '.join(failed)}", ""]
    return "\n".join(lines)


def plot(records: list[dict], losses: list[str], path: pathlib.Path) -> None:
    """Test accuracy against the noise rate, one panel per task, one line (mean, ± std band) per loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for loss in losses:
            rows = [r for r in records if r["task"] == task and r["loss"] == loss and r["status"] == "ok"]
            rates = sorted({r["rate"] for r in rows})
            scores = [[100 * r["test_accuracy"] for r in rows if r["rate"] == rate] for rate in rates]
            means = [statistics.mean(s) for s in scores]
            spreads = [statistics.stdev(s) if len(s) > 1 else 0.0 for s in scores]
            axis.plot([100 * r for r in rates], means, marker="o", label=loss)
            axis.fill_between([100 * r for r in rates], [m - s for m, s in zip(means, spreads)],
                              [m + s for m, s in zip(means, spreads)], alpha=0.15)
        axis.set(title=task, xlabel="training labels changed (%)", ylabel="test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASK_STEPS))
    parser.add_argument("--rates", default="0,0.2,0.4")
    parser.add_argument("--losses", default=",".join(DEFAULT_LOSSES), help=f"of {', '.join(LOSSES)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=float, default=1.0, help="training length in epochs of each task")
    parser.add_argument("--steps", type=int, help="optimizer steps of every run (replaces --epochs; smoke tests)")
    parser.add_argument("--workers", type=int, default=1, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "label_noise"), help="the run folders")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "label_noise"), help="results and figure")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(args.tasks) - set(TASK_STEPS)) + sorted(set(args.losses.split(",")) - set(LOSSES))
    if unknown:
        parser.error(f"unknown task(s) or loss(es) {unknown}; tasks: {', '.join(TASK_STEPS)}; "
                     f"losses: {', '.join(LOSSES)}")
    args.rates = [float(r) for r in args.rates.split(",")]
    args.losses = args.losses.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    runs, out = pathlib.Path(args.runs), pathlib.Path(args.out)
    cells = grid(args)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:  # each run is its own process
        records = list(pool.map(lambda cell: run_cell(cell, runs, args.threads), cells))
    for record in records:
        score = f"test accuracy {record['test_accuracy']:.4f}" if record["status"] == "ok" else f"FAILED ({record['log']})"
        print(f"{record['name']}: {score}")
    from peftlab.io import files

    out.mkdir(parents=True, exist_ok=True)
    grid_values = {k: getattr(args, k) for k in ("tasks", "rates", "losses", "seeds", "epochs", "steps")}
    files.write_json(out / "results.json", {"grid": grid_values, "recipe": RECIPE, "losses": LOSSES, "runs": records})
    files.write_text(out / "report.md", report(records, args.rates, args.losses))
    if any(r["status"] == "ok" for r in records):
        plot(records, args.losses, out / "accuracy_vs_noise.png")
    print(f"results, report and figure in {out}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
