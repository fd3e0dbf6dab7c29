"""Combining adapters: LoRA adapters for movie sentiment and SMS spam merged by every peftlab.combine method.

Three ordinary `peftlab train` runs on MiniLM-L6 (LoRA r 8, alpha 16 on query/value, AdamW at 2e-3,
linear schedule, 6% warmup, batch 32, one epoch, seed 0; the standard suite's recipe):

    movie   movie-sentiment (2 classes), its own head
    sms     sms-spam (2 classes), its own head
    both    one adapter and one 4-way head trained on the union of the two training splits (a JSONL
            file this script writes); each task is scored with its two rows of that head

Then, for each task, the model of its own run (its adapter and head) gets both encoder adapters
attached beside it, and every combination in the grid is made with peftlab.combine and scored
on the task's test split (the runs' own seeded split) with the task's head:

    task_arithmetic, cat, svd, linear              at weights (movie, sms) in WEIGHTS
    ties, dare_linear, dare_ties, magnitude_prune  and their _svd variants, at WEIGHTS x DENSITIES

Usage (the full experiment: about 35-50 minutes on 2 CPU cores, most of it training and scoring
the 2 x 60 combinations):

    python bench/merging.py [--threads 2] [--runs DIR] [--out DIR] [--smoke]

--smoke: 200 examples per task, 4 training steps, one weight and density, 64 test rows: checks
the pipeline in a few minutes, and writes under runs/merging-smoke and /tmp unless told otherwise.
Finished runs (a summary.json in their folder) are reused. Writes, under --out
(bench/results/merging): results.json, report.md (the table) and merging.png (movie accuracy
against SMS accuracy, one point per combination, the single-task and two-task adapters marked).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TASKS = {"movie": "movie-sentiment", "sms": "sms-spam"}
SEED = 0
SPLIT = [0.8, 0.1, 0.1]
RECIPE = {  # the standard suite's run section, with LoRA at its selected rate
    "model": "minilm-l6", "data.max_length": 64, "data.split": SPLIT, "seed": SEED,
    "method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]},
    "optimizer": {"name": "adamw", "lr": 2.0e-3, "weight_decay": 0.0},
    "schedule": {"name": "linear", "warmup_ratio": 0.06},
    "train.batch_size": 32, "train.eval_batch_size": 128, "train.save_every": 1000000, "train.log_every": 25,
    "train.progress": False, "train.group_by_length": True, "train.epochs": 1,
}
WEIGHTS = [(0.5, 0.5), (0.7, 0.3), (1.0, 1.0)]
DENSITIES = [0.2, 0.5]
PLAIN = ["task_arithmetic", "cat", "svd", "linear"]
SPARSE = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
SPARSE += [m + "_svd" for m in SPARSE]


def train(name: str, values: dict, runs: pathlib.Path, threads: int) -> pathlib.Path:
    """One `peftlab train` run in its own process (unless it finished before); its folder."""
    folder = runs / name
    if not (folder / "summary.json").is_file():
        argv = [sys.executable, "-m", "peftlab", "train", "--overwrite"]
        for key, value in {**values, "output": str(folder)}.items():
            argv += ["--set", f"{key}={json.dumps(value)}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        runs.mkdir(parents=True, exist_ok=True)
        with (runs / f"{name}.log").open("w") as log:
            done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        if done.returncode != 0:
            raise SystemExit(f"run {name} failed: see {runs / f'{name}.log'}")
    return folder


def task_splits(task: str, limit: int | None) -> tuple[list, list, list, list[str]]:
    """(train, validation, test, label names) as the task's run splits it."""
    from peftlab.recipe import data
    from peftlab.recipe.config import Data

    loaded = data.load(task, Data(limit=limit), SEED)
    return (*data.split(loaded.rows, tuple(SPLIT), SEED), loaded.label_names)


def both_tasks_file(runs: pathlib.Path, limit: int | None) -> pathlib.Path:
    """The two training splits in one JSONL file, labels "<tag>:<name>" (no validation or test row of
    either task is in it)."""
    from peftlab.io import files

    lines = []
    for tag, task in TASKS.items():
        train_rows, _, _, names = task_splits(task, limit)
        lines += [json.dumps({"text": r["text"], "label": f"{tag}:{names[r['label']]}"}) for r in train_rows]
    path = runs / "both-tasks.jsonl"
    runs.mkdir(parents=True, exist_ok=True)
    files.write_text(path, "\n".join(lines) + "\n")
    return path


def train_all(args: argparse.Namespace) -> dict[str, pathlib.Path]:
    runs = pathlib.Path(args.runs)
    shorter = {"data.limit": args.limit, "train.steps": 4} if args.smoke else {}
    folders = {tag: train(tag, {**RECIPE, "task": task, **shorter}, runs, args.threads) for tag, task in TASKS.items()}
    both = {**RECIPE, "task": "file", "data.path": str(both_tasks_file(runs, args.limit)),
            "data.kind": "classification", "data.split": [0.9, 0.05, 0.05],
            **({"train.steps": 4} if args.smoke else {})}
    folders["both"] = train("both", both, runs, args.threads)
    return folders


def score(model, tokenizer, rows: list) -> float:
    import torch

    from peftlab.recipe.metrics import score as recipe_score

    with torch.no_grad():
        return recipe_score(model, tokenizer, rows, "classification", RECIPE["data.max_length"], 128,
                            progress=False)["accuracy"]


def two_task_head(model, task_labels: list[str], tag: str, file_labels: list[str]) -> None:
    """Keep the rows of the 4-way head that belong to one task, in that task's label order."""
    import torch

    rows = torch.tensor([file_labels.index(f"{tag}:{name}") for name in task_labels])
    head = model.classifier
    fresh = torch.nn.Linear(head.in_features, len(rows))
    with torch.no_grad():
        fresh.weight.copy_(head.weight[rows])
        fresh.bias.copy_(head.bias[rows])
    model.classifier = fresh
    model.num_labels = model.config.num_labels = len(rows)


def references(folders: dict[str, pathlib.Path], tests: dict[str, tuple[list, list[str]]]) -> list[dict]:
    """The single-task adapters on their own task, and the two-task adapter on each task."""
    from peftlab.recipe.runs import load_trained

    records = []
    for tag, (rows, names) in tests.items():
        model, tokenizer, _, _ = load_trained(folders[tag])
        records.append({"kind": "single", "task": tag, "accuracy": score(model, tokenizer, rows)})
        model, tokenizer, _, task = load_trained(folders["both"])
        two_task_head(model, names, tag, task["label_names"])
        records.append({"kind": "both", "task": tag, "accuracy": score(model, tokenizer, rows)})
    return records


def grid(smoke: bool) -> list[dict]:
    weights, densities = (WEIGHTS[:1], DENSITIES[-1:]) if smoke else (WEIGHTS, DENSITIES)
    cells = [{"method": m, "weights": w, "density": None} for m in PLAIN for w in weights]
    cells += [{"method": m, "weights": w, "density": d} for m in SPARSE for w in weights for d in densities]
    return cells


def combinations(folders: dict[str, pathlib.Path], tests: dict, cells: list[dict]) -> list[dict]:
    """Every cell on every task: the task's own model (adapter + head), both encoder adapters beside it."""
    import peftlab
    from peftlab.recipe.runs import attach_run_adapter, load_trained

    records = []
    for tag, (rows, _) in tests.items():
        model, tokenizer, _, _ = load_trained(folders[tag])
        for other in TASKS:
            attach_run_adapter(model, folders[other], other)
        for cell in cells:
            weights = dict(zip(TASKS, cell["weights"]))
            peftlab.combine(model, weights, method=cell["method"], name="combined", density=cell["density"])
            accuracy = score(model, tokenizer, rows)
            peftlab.detach(model, "combined")
            records.append({"kind": "combined", "task": tag, **cell, "accuracy": accuracy})
            print(f"{tag:5s} {cell['method']:20s} {cell['weights']} {cell['density']}: {accuracy:.4f}", flush=True)
    return records


def report(records: list[dict], smoke: bool) -> str:
    """report.md: one row per combination, movie and SMS test accuracy and their mean."""
    def cell(kind: str, task: str, **match) -> float:
        return next(r["accuracy"] for r in records if r["kind"] == kind and r["task"] == task
                    and all(r.get(k) == v for k, v in match.items()))

    lines = ["# Combining adapters: movie sentiment + SMS spam", "",
             "LoRA (r 8, query/value) on MiniLM-L6, one adapter per task, combined by `peftlab.combine`; each task "
             "scored on its test split with its own head. `bench/merging.py` made this page"
             + (" (smoke: tiny runs, not results)." if smoke else "."), "",
             "| adapter | weights (movie, sms) | density | movie acc. | sms acc. | mean |", "|---|---|---|---|---|---|"]
    for kind, label in (("single", "single-task adapters (each its own)"), ("both", "two-task adapter")):
        movie, sms = cell(kind, "movie"), cell(kind, "sms")
        lines.append(f"| {label} | - | - | {100 * movie:.1f} | {100 * sms:.1f} | {50 * (movie + sms):.1f} |")
    for r in [r for r in records if r["kind"] == "combined" and r["task"] == "movie"]:
        match = {"method": r["method"], "weights": r["weights"], "density": r["density"]}
        movie, sms = r["accuracy"], cell("combined", "sms", **match)
        weights = ", ".join(f"{w:g}" for w in r["weights"])
        density = "-" if r["density"] is None else f"{r['density']:g}"
        lines.append(f"| {r['method']} | {weights} | {density} | {100 * movie:.1f} | {100 * sms:.1f} | "
                     f"{50 * (movie + sms):.1f} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: pathlib.Path) -> None:
    """SMS accuracy against movie accuracy: one point per combination, colour by method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5.5))
    combined = [r for r in records if r["kind"] == "combined" and r["task"] == "movie"]
    for number, method in enumerate(dict.fromkeys(r["method"] for r in combined)):
        points = [(r["accuracy"], next(s["accuracy"] for s in records if s["kind"] == "combined" and s["task"] == "sms"
                                       and all(s[k] == r[k] for k in ("method", "weights", "density"))))
                  for r in combined if r["method"] == method]
        axis.scatter([100 * x for x, _ in points], [100 * y for _, y in points], s=22, label=method,
                     marker="os^v<>Dph*"[number % 10], color=plt.cm.tab20(number))
    for kind, marker in (("single", "*"), ("both", "P")):
        movie = next(r["accuracy"] for r in records if r["kind"] == kind and r["task"] == "movie")
        sms = next(r["accuracy"] for r in records if r["kind"] == kind and r["task"] == "sms")
        axis.scatter([100 * movie], [100 * sms], s=160, marker=marker, color="black",
                     label="single-task adapters" if kind == "single" else "two-task adapter")
    axis.set(xlabel="movie sentiment test accuracy (%)", ylabel="SMS spam test accuracy (%)",
             title="Combined LoRA adapters, each task with its own head")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (training runs and scoring)")
    parser.add_argument("--runs", help="the run folders (default runs/merging, or runs/merging-smoke)")
    parser.add_argument("--out", help="results, report and figure (default bench/results/merging, or "
                                      "/tmp/merging-smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny runs and grid: checks the pipeline only")
    args = parser.parse_args(argv)
    args.limit = 200 if args.smoke else None
    args.runs = args.runs or str(ROOT / "runs" / ("merging-smoke" if args.smoke else "merging"))
    args.out = args.out or ("/tmp/merging-smoke" if args.smoke else str(ROOT / "bench" / "results" / "merging"))
    return args


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    import torch

    from peftlab.io import files

    torch.set_num_threads(args.threads)
    folders = train_all(args)
    tests = {}
    for tag, task in TASKS.items():
        _, _, test, names = task_splits(task, args.limit)
        tests[tag] = (test[:64] if args.smoke else test, names)
    records = references(folders, tests) + combinations(folders, tests, grid(args.smoke))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {"recipe": RECIPE, "weights": WEIGHTS, "densities": DENSITIES, "smoke": args.smoke,
             "runs": {k: str(v) for k, v in folders.items()}}
    files.write_json(out / "results.json", {"setup": setup, "records": records})
    files.write_text(out / "report.md", report(records, args.smoke))
    plot(records, out / "merging.png")
    print(f"results, report and figure in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
