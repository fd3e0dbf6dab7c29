"""Intruder dimensions on the three tasks: full fine-tuning vs LoRA at ranks 1-64, with and without
rank-stabilised scaling, and the other low-rank methods at their bench settings.

An intruder dimension (Shuttleworth et al. 2024, "LoRA vs full fine-tuning: an illusion of
equivalence", arXiv 2410.21228) is one of the top-k left singular vectors of a tuned weight W with
no left singular vector of the base W0 at |cosine| >= threshold. Every run here is an ordinary
`peftlab train` run with the standard suite's recipe for its task (bench/suites/standard.yaml:
MiniLM-L6, max_length 64, split 0.8/0.1/0.1, AdamW without weight decay, linear schedule with 6%
warmup, batch 32, about one epoch: 250 / 135 / 121 steps on movie-sentiment / trec-coarse /
sms-spam), seed 0, followed by `peftlab analyze RUN_DIR --k 10 --threshold 0.5`.

    group core    full     full fine-tuning at the rate the standard suite selected for it per task
                  lora     r in 1, 2, 4, 8, 16, 32, 64, alpha 16, on query/value, at the rate the
                           suite selected for LoRA (r 8, alpha 16) per task, the same for every rank;
                           scale alpha / r, and with rslora alpha / sqrt(r)
    group family  every other low-rank method of the standard suite (FAMILY below) at its bench
                  settings (the suite's method fields and overrides) and its selected rate

The learning rates come from the standard suite's records (bench/results/standard/) through the
bench's own selection (peftlab.bench.runner.select_lr), so they are the rates its final runs used;
the runs of `full`, of LoRA at r 8 without rslora and of the family repeat the suite's seed-0
runs, and the report shows the suite's test accuracy beside this bench's.

Against the paper's setting: k = 10 and threshold 0.5 are the official code's defaults
(reeceshuttle/intruder-dimensions, find_intruder_dimensions.py), and it also counts over the tuned
matrices only. Its rank sweep is not ours: its fine-tuning script scales alpha with the rank
(alpha = 2r, so alpha / r = 2 at every rank) and sets the learning rate per rank (3e-4 at r 1,
1.5e-4 at r 8 on RoBERTa-base / MNLI, full fine-tuning 1e-5). Here alpha stays 16 and one rate
serves every rank, so plain LoRA's update shrinks as 16 / r grows small while rsLoRA's (16 /
sqrt(r)) does not: the comparison of the two lines is the rank-stabilisation question itself.

Full fine-tuning changes every linear layer; LoRA and the family only query and value. The
comparisons count the same 12 matrices (query and value of the 6 layers: at most 12 x k = 120
intruders); results.json has every run's total over all changed matrices and per matrix type.

Usage (the whole bench: 108 runs, about 4 CPU-hours at one thread per run (each task's run costs
about 3.5 / 1.3 / 1.7 minutes; core: 15 runs per task, about 1.6 h; family: 21 per task, about
2.3 h) plus about 10-20 s per analysis; --workers 2 halves the wall time on two cores):

    python bench/intruders.py [--group core|family] [--tasks ...] [--ranks 1,2,...] [--methods ...]
                              [--workers 2] [--threads 1] [--runs DIR] [--out DIR] [--smoke]

Finished runs (summary.json present, same config) are skipped and finished analyses
(analysis/analysis.json at the same k and threshold) reused, so an interrupted bench continues;
a run whose config changed is trained again. After its analysis a run's checkpoints/ folder
goes (full fine-tuning's holds the model and its optimizer state); adapter/, config.yaml,
task.json (what the analysis reads) and summary.json stay.
--smoke: 4 steps, 200 examples, ranks 1 and 8, one task (sms-spam unless --tasks): checks the
pipeline in minutes, under /tmp/intruders-smoke unless told otherwise.
Writes, under --out (bench/results/intruders): results.json (one record per run), report.md and
intruders.png (intruders against rank, one panel per task) and intruders_family.png.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = "standard"
SUITE_RESULTS = ROOT / "bench" / "results" / SUITE
RANKS = (1, 2, 4, 8, 16, 32, 64)
LORA_ALPHA = 16.0  # every rank: the standard suite's (and LoRA's default) alpha
K, THRESHOLD = 10, 0.5  # the setting and the official code's defaults
SMOKE = {"steps": 4, "limit": 200, "ranks": (1, 8), "task": "sms-spam"}
GROUPS = ("core", "family")

# The standard suite's low-rank methods besides LoRA itself: each one's weight change is built of
# low-rank factors, and each has a weight form `peftlab analyze` merges.
FAMILY = {
    "adalora": "P diag(lambda) Q, ranks pruned during training",
    "allora": "B A with adaptive per-row learning rates",
    "corda": "B A initialised from a context-oriented SVD of W0 (residual)",
    "dora": "a magnitude times W0 + B A normalised",
    "dsee": "B A plus a sparse change",
    "eva": "B A, A from the SVD of activations",
    "flora": "A G B with a small trained core G",
    "increlora": "B A whose rank grows during training",
    "lamda": "B A with an r x r core; B's columns freeze",
    "loldu": "L diag(d) U of rank r, only the diagonal (and a scale) trains",
    "lora_ga": "B A initialised from the SVD of a gradient (residual)",
    "lora_sb": "B R A, only the r x r R trains",
    "nola": "A and B mixtures of frozen random bases",
    "olora": "B A initialised from a QR of W0 (residual)",
    "pissa": "B A from W0's top singular triplets (residual)",
    "randlora": "a sum of frozen random low-rank bases with trained scales (full rank by design)",
    "rslora": "LoRA at r 8 with scale alpha / sqrt(r), at its own selected rate",
    "s2ft": "chosen rows or columns of W: rank at most the units chosen",
    "sora": "B diag(g) A, the gate g made sparse",
    "svfit": "trains W0's top-r singular values (the base's own singular vectors)",
    "vera": "diag(b) B diag(d) A with frozen random A and B",
}
# The rest of the standard suite, and why it is not in the family (tests check the two cover it).
NOT_FAMILY = {
    "full": "group core", "lora": "group core (the rank sweep)",
    "head-only": "changes no weight outside the task head",
    "full-galore": "full fine-tuning (every weight changes) with a low-rank optimizer state",
    "full-fira": "full fine-tuning with a low-rank optimizer state",
    "full-frugal": "full fine-tuning with a partly state-free optimizer",
    "bitfit": "trains biases, no weight matrix", "ln_tuning": "trains norm layers, no weight matrix",
    "ia3": "a diagonal scale of each weight, not low-rank", "ssf": "a diagonal scale and shift, not low-rank",
    "spiel": "a sparse change", "hft": "trains whole matrices in place", "lisa": "trains whole blocks in place",
    "lora_moe": "no weight form (token-routed experts)",
    "houlsby": "no weight form (bottleneck adapter)", "pfeiffer": "no weight form (bottleneck adapter)",
    "parallel_adapter": "no weight form (bottleneck adapter)", "mam": "no weight form (prefix + adapter)",
    "compacter": "no weight form (bottleneck adapter)", "compacter_pp": "no weight form (bottleneck adapter)",
    "prompt": "no weight form (soft prompt)", "prefix": "no weight form (prefix)",
    "p_tuning_v2": "no weight form (prefix)",
}


# ---- the runs and their configs ------------------------------------------------------------------


def selected_rate(suite, method: str, task: str, results_dir: pathlib.Path) -> float:
    """The learning rate the suite's selection chose for (method, task), read from its records."""
    from peftlab.bench import runner
    from peftlab.bench.suite import Job

    rate, _ = runner.select_lr(suite, Job(method, task, suite.seeds[0], "final"), results_dir)
    return rate


def run_config(suite, method: str, task: str, lr: float, output: pathlib.Path) -> dict:
    """The suite's run config of `method` on `task` at `lr` (seed: the suite's first), defaults filled."""
    from peftlab.bench import runner, suite as suites
    from peftlab.bench.suite import Job

    job = Job(method, task, suite.seeds[0], "final")
    config = suites.run_config(suite, job, lr, output, runner.accepted_fields(method))
    return runner.with_recipe_defaults(config)


def shortened(suite, steps: int, limit: int):
    """The suite with every task at `steps` steps on its first `limit` examples (smoke runs)."""
    from peftlab.bench.suite import deep_merge

    short = {"train": {"steps": steps}}
    return dataclasses.replace(suite, run=deep_merge(suite.run, {**short, "data": {"limit": limit}}),
                               tasks={task: deep_merge(own, short) for task, own in suite.tasks.items()})


def cell(name: str, group: str, task: str, method: str, lr: float, config: dict, **extra) -> dict:
    return {"name": f"{task}--{name}", "group": group, "task": task, "method": method, "lr": lr,
            "config": config, **extra}


def lora_variant(config: dict, r: int, rslora: bool) -> dict:
    """The suite's LoRA config at rank r, alpha LORA_ALPHA, with or without rank-stabilised scaling."""
    varied = copy.deepcopy(config)
    varied["method"].update(name="lora", r=r, alpha=LORA_ALPHA, rslora=rslora)
    return varied


def core_cells(suite, recipe_suite, task: str, ranks, runs: pathlib.Path, results_dir: pathlib.Path) -> list[dict]:
    """full at its selected rate; LoRA at every rank, with and without rslora, at LoRA's selected rate."""
    full_lr = selected_rate(suite, "full", task, results_dir)
    cells = [cell("full", "core", task, "full", full_lr,
                  run_config(recipe_suite, "full", task, full_lr, runs / f"{task}--full"))]
    lora_lr = selected_rate(suite, "lora", task, results_dir)
    base = run_config(recipe_suite, "lora", task, lora_lr, runs)
    for rslora in (False, True):
        for r in ranks:
            name = f"lora-r{r}" + ("-rslora" if rslora else "")
            config = {**lora_variant(base, r, rslora), "output": str(runs / f"{task}--{name}")}
            cells.append(cell(name, "core", task, "lora", lora_lr, config, r=r, rslora=rslora))
    return cells


def family_cells(suite, recipe_suite, task: str, methods, runs: pathlib.Path, results_dir: pathlib.Path) -> list[dict]:
    """Each family method at its bench settings and selected rate; one without a selected rate is
    recorded as such (its selection runs have no record) and not trained."""
    from peftlab.errors import PeftlabError

    cells = []
    for method in methods:
        try:
            lr = selected_rate(suite, method, task, results_dir)
        except PeftlabError as err:
            cells.append(cell(method, "family", task, method, None, None, status="no selected rate", error=str(err)))
            continue
        cells.append(cell(method, "family", task, method, lr,
                          run_config(recipe_suite, method, task, lr, runs / f"{task}--{method}")))
    return cells


def plan(args: argparse.Namespace, suite, results_dir: pathlib.Path = SUITE_RESULTS) -> list[dict]:
    """Every run of the chosen groups, core first (full and the rank sweep), then the family."""
    runs = pathlib.Path(args.runs)
    recipe_suite = shortened(suite, SMOKE["steps"], SMOKE["limit"]) if args.smoke else suite
    cells = []
    if "core" in args.groups:
        for task in args.tasks:
            cells += core_cells(suite, recipe_suite, task, args.ranks, runs, results_dir)
    if "family" in args.groups:
        for task in args.tasks:
            cells += family_cells(suite, recipe_suite, task, args.methods, runs, results_dir)
    return cells


# ---- training, analysis and a run's record -----------------------------------------------------


def train_arguments(config: dict) -> list[str]:
    """`peftlab train` arguments for the whole config, one --set per section.

    The first --set names a method without fields: the recipe's default method is LoRA (r 8,
    alpha 16), and a newly named method keeps the fields of the old one it shares (recipe/config.py
    merge), so VeRA would otherwise train at r 8 instead of its own default.
    """
    arguments = ["--set", 'method={"name": "full"}']
    for key, value in config.items():
        arguments += ["--set", f"{key}={json.dumps(value)}"]
    return arguments


def stale(folder: pathlib.Path, config: dict) -> bool:
    """The run in `folder` was trained from another config than `config` (its place aside)."""
    from peftlab.recipe import config as runconfig

    saved = runconfig.validate(runconfig.read_yaml(folder / "config.yaml")).to_dict()
    wanted = runconfig.validate(config).to_dict()
    return {**saved, "output": None} != {**wanted, "output": None}


def subprocess_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}


def train(entry: dict, folder: pathlib.Path, log: pathlib.Path, threads: int) -> bool:
    """Train the run unless it finished before with the same config; False when training failed."""
    if (folder / "summary.json").is_file() and not stale(folder, entry["config"]):
        return True
    shutil.rmtree(folder / "analysis", ignore_errors=True)  # an older run's analysis
    argv = [sys.executable, "-m", "peftlab", "train", "--overwrite", *train_arguments(entry["config"])]
    with log.open("w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(threads), cwd=ROOT)
    return done.returncode == 0


def analysis_of(folder: pathlib.Path) -> dict | None:
    """The run's analysis.json when it was made at this bench's k and threshold."""
    path = folder / "analysis" / "analysis.json"
    if not path.is_file():
        return None
    analysis = json.loads(path.read_text())
    intruders = analysis.get("intruders", {})
    return analysis if (intruders.get("k"), intruders.get("threshold")) == (K, THRESHOLD) else None


def analyse(folder: pathlib.Path, log: pathlib.Path, threads: int) -> dict | None:
    """`peftlab analyze RUN_DIR` unless its analysis is there; the analysis, None when it failed."""
    if analysis_of(folder) is None:
        argv = [sys.executable, "-m", "peftlab", "analyze", str(folder), "--k", str(K), "--threshold", str(THRESHOLD)]
        with log.open("a") as out:
            subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(threads), cwd=ROOT)
    return analysis_of(folder)


def matrix_type(layer: str) -> str:
    """A layer's name without its block: 'bert.encoder.layer.3.attention.self.query' ->
    'attention.self.query'; outside the blocks, the last two parts ('pooler.dense')."""
    inside = re.search(r"\blayer\.\d+\.(.+)$", layer)
    return inside.group(1) if inside else ".".join(layer.split(".")[-2:])


def intruder_counts(analysis: dict, targets: list[str]) -> dict:
    """Intruders in total, per matrix type, and in the matrices named by `targets` (query, value)."""
    per_matrix = analysis["intruders"]["per_matrix"]
    per_type: dict[str, int] = {}
    for layer, count in per_matrix.items():
        per_type[matrix_type(layer)] = per_type.get(matrix_type(layer), 0) + count
    in_targets = sum(count for layer, count in per_matrix.items() if layer.split(".")[-1] in targets)
    target_layers = sum(1 for layer in per_matrix if layer.split(".")[-1] in targets)
    return {"total": analysis["intruders"]["total"], "targets": in_targets, "target_matrices": target_layers,
            "matrices": len(per_matrix), "per_type": per_type, "k": K, "threshold": THRESHOLD}


def suite_accuracy(method: str, task: str, results_dir: pathlib.Path = SUITE_RESULTS) -> float | None:
    """The standard suite's seed-0 test accuracy of (method, task), None without a record."""
    path = results_dir / f"{method}--{task}--s0.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("metrics", {}).get("test", {}).get("accuracy")


def repeats_suite_run(entry: dict) -> bool:
    """This run has the config of the suite's seed-0 final run (full, the family, LoRA r 8 plain)."""
    return entry["method"] != "lora" or (entry["r"] == 8 and not entry["rslora"])


def run_entry(entry: dict, runs: pathlib.Path, threads: int, targets: list[str], smoke: bool) -> dict:
    """Train, analyse, tidy one run; its record (config left out: the run's config.yaml has it)."""
    record = {k: v for k, v in entry.items() if k != "config"}
    record.setdefault("r", None), record.setdefault("rslora", None)
    if entry.get("status"):  # nothing to train (no selected rate)
        return record
    folder, log = runs / entry["name"], runs / f"{entry['name']}.log"
    runs.mkdir(parents=True, exist_ok=True)
    record.update(run=str(folder), log=str(log))
    if not train(entry, folder, log, threads):
        return {**record, "status": "train failed"}
    analysis = analyse(folder, log, threads)
    if analysis is None:
        return {**record, "status": "analysis failed"}
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the analysis reads adapter/ only
    fields = method_fields(folder)
    summary = json.loads((folder / "summary.json").read_text())
    suite_score = suite_accuracy(entry["method"], entry["task"]) if repeats_suite_run(record) and not smoke else None
    return {**record, "status": "ok", "r": fields.get("r"), "rslora": fields.get("rslora"),
            "test_accuracy": summary["metrics"]["test"]["accuracy"], "suite_test_accuracy": suite_score,
            "intruders": intruder_counts(analysis, targets)}


def method_fields(folder: pathlib.Path) -> dict:
    """Every field of the run's method config, its defaults included ({} for full fine-tuning)."""
    import peftlab
    from peftlab.recipe import config as runconfig
    from peftlab.recipe.adaptation import BASELINES

    section = dict(runconfig.read_yaml(folder / "config.yaml")["method"])
    name = section.pop("name")
    return {} if name in BASELINES else dataclasses.asdict(peftlab.config(name, **section))


# ---- the report ----------------------------------------------------------------------------------


def find(records: list[dict], task: str, method: str, **match) -> dict | None:
    """The record of (task, method) whose fields equal `match`, None when there is none."""
    for record in records:
        if record["task"] == task and record["method"] == method and all(record.get(k) == v for k, v in match.items()):
            return record
    return None


def intruder_cell(record: dict | None, key: str = "targets") -> str:
    if record is None:
        return "-"
    if record.get("status") != "ok":
        return record.get("status", "-")
    return str(record["intruders"][key])


def accuracy_cell(record: dict | None, key: str = "test_accuracy") -> str:
    value = None if record is None else record.get(key)
    return "-" if value is None else f"{100 * value:.1f}"


def rank_table(records: list[dict], task: str, ranks) -> list[str]:
    """Intruders (query/value) and test accuracy per rank, plain scaling and rank-stabilised."""
    lines = ["| r | alpha / r | LoRA intruders | LoRA acc. | alpha / sqrt(r) | rsLoRA intruders | rsLoRA acc. |",
             "|---|---|---|---|---|---|---|"]
    for r in ranks:
        plain, stable = (find(records, task, "lora", r=r, rslora=rs) for rs in (False, True))
        lines.append(f"| {r} | {LORA_ALPHA / r:.3g} | {intruder_cell(plain)} | {accuracy_cell(plain)} | "
                     f"{LORA_ALPHA / r ** 0.5:.3g} | {intruder_cell(stable)} | {accuracy_cell(stable)} |")
    full = find(records, task, "full")
    if full is not None and full.get("status") == "ok":
        counts = full["intruders"]
        lines += ["", f"Full fine-tuning (lr {full['lr']:g}): {counts['targets']} intruders in its "
                      f"{counts['target_matrices']} query/value matrices, {counts['total']} over all "
                      f"{counts['matrices']} changed matrices; test accuracy {accuracy_cell(full)}%."]
    return lines


def family_table(records: list[dict], task: str) -> list[str]:
    """Full fine-tuning, LoRA at its bench setting (r 8) and each family method on one task."""
    lines = ["| method | lr | r | intruders (query/value) | test acc. | standard suite's acc. | all changed matrices |",
             "|---|---|---|---|---|---|---|"]
    rows = [find(records, task, "full"), find(records, task, "lora", r=8, rslora=False)]
    rows += [r for r in records if r["task"] == task and r["group"] == "family"]
    for record in rows:
        if record is None:
            continue
        label = "lora (r 8, the core run)" if record["method"] == "lora" else record["method"]
        lr = "-" if record.get("lr") is None else f"{record['lr']:g}"
        matrices = (f"{record['intruders']['total']} in {record['intruders']['matrices']}"
                    if record.get("status") == "ok" else "-")
        lines.append(f"| {label} | {lr} | {record.get('r') if record.get('r') is not None else '-'} | "
                     f"{intruder_cell(record)} | {accuracy_cell(record)} | "
                     f"{accuracy_cell(record, 'suite_test_accuracy')} | {matrices} |")
    return lines


def type_table(records: list[dict], tasks: list[str]) -> list[str]:
    """Full fine-tuning's intruders per matrix type (summed over the 6 layers), per task."""
    fulls = {task: find(records, task, "full") for task in tasks}
    fulls = {task: r for task, r in fulls.items() if r is not None and r.get("status") == "ok"}
    if not fulls:
        return []
    types = list(dict.fromkeys(t for r in fulls.values() for t in r["intruders"]["per_type"]))
    lines = ["| matrix type | " + " | ".join(fulls) + " |", "|---|" + "---|" * len(fulls)]
    for kind in types:
        lines.append(f"| {kind} | " + " | ".join(str(r["intruders"]["per_type"].get(kind, "-"))
                                                   for r in fulls.values()) + " |")
    return lines


def report(records: list[dict], tasks: list[str], ranks, smoke: bool) -> str:
    """report.md: per task, intruders against rank, then full fine-tuning against the methods."""
    lines = ["# Intruder dimensions: full fine-tuning, LoRA ranks, and the low-rank methods", "",
             f"MiniLM-L6, the standard suite's recipe per task, seed 0. Intruders: of the top {K} left singular "
             f"vectors of each tuned matrix, those with no base singular vector at |cos| >= {THRESHOLD} "
             f"(`peftlab analyze`), summed over the 12 query/value matrices (at most {12 * K}). LoRA: alpha "
             f"{LORA_ALPHA:g} at every rank, one rate per task (the suite's choice for LoRA r 8). Accuracy: test "
             "split, %. `bench/intruders.py` made this page" + (" (smoke: tiny runs, not results)." if smoke else "."),
             ""]
    for task in tasks:
        if any(r["task"] == task and r["method"] == "lora" for r in records):
            lines += [f"## {task}: intruders against rank", "", *rank_table(records, task, ranks), ""]
        lines += [f"## {task}: full fine-tuning and the methods at their bench settings", "",
                  *family_table(records, task), ""]
    types = type_table(records, tasks)
    if types:
        lines += ["## Full fine-tuning's intruders per matrix type", "", *types, ""]
    failed = [f"{r['name']} ({r['status']})" for r in records if r.get("status") != "ok"]
    if failed:
        lines += [f"Runs without a result (see their logs): {', '.join(failed)}", ""]
    return "\n".join(lines)


# ---- figures -------------------------------------------------------------------------------------


def plot_ranks(records: list[dict], tasks: list[str], path: pathlib.Path) -> None:
    """Intruders (query/value) against rank, one panel per task: LoRA, rsLoRA, full fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for rslora, label in ((False, f"LoRA (alpha {LORA_ALPHA:g} / r)"), (True, f"rsLoRA (alpha {LORA_ALPHA:g} / sqrt r)")):
            rows = sorted((r["r"], r["intruders"]["targets"]) for r in records if r["task"] == task
                          and r["method"] == "lora" and r["rslora"] is rslora and r["status"] == "ok")
            axis.plot([x for x, _ in rows], [y for _, y in rows], marker="o", label=label)
        full = find(records, task, "full", status="ok")
        if full is not None:
            axis.axhline(full["intruders"]["targets"], color="black", linestyle="--", label="full fine-tuning")
        axis.set_xscale("log", base=2)
        ranks = sorted({r["r"] for r in records if r["task"] == task and r["method"] == "lora"})
        axis.set_xticks(ranks, [str(r) for r in ranks])
        axis.set_ylim(0, max(1, axis.get_ylim()[1]) * 1.1)
        axis.set(title=task, xlabel="LoRA rank r", ylabel=f"intruders in query/value (top {K}, |cos| < {THRESHOLD})")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_family(records: list[dict], tasks: list[str], path: pathlib.Path) -> None:
    """Intruders (query/value) of each family method at its bench settings, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in records if r["group"] == "family" and r["status"] == "ok"))
    figure, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 0.3 * len(methods) + 1.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        counts = [(find(records, task, m, status="ok") or {}).get("intruders", {}).get("targets") for m in methods]
        axis.barh(range(len(methods)), [0 if c is None else c for c in counts], color="tab:blue")
        axis.set_yticks(range(len(methods)), methods, fontsize=8)
        axis.invert_yaxis()
        for method, style in (("full", "--"), ("lora", ":")):
            reference = find(records, task, method, status="ok", **({"r": 8, "rslora": False} if method == "lora" else {}))
            if reference is not None:
                axis.axvline(reference["intruders"]["targets"], color="black", linestyle=style,
                             label="full fine-tuning" if method == "full" else "LoRA r 8")
        axis.set_xlim(0, max(1, axis.get_xlim()[1]) * 1.1)
        axis.set(title=task, xlabel="intruders in query/value")
        axis.grid(alpha=0.3, axis="x")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---- the command ---------------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def arguments(argv: list[str] | None, suite) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=GROUPS, help="only this group (default: core, then family)")
    parser.add_argument("--tasks", help=f"comma-separated (default: the suite's: {', '.join(suite.tasks)})")
    parser.add_argument("--ranks", help=f"LoRA ranks (default {','.join(map(str, RANKS))})")
    parser.add_argument("--methods", help="family methods (default: all of FAMILY)")
    parser.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--runs", help="the run folders (default runs/intruders)")
    parser.add_argument("--out", help="results, report and figures (default bench/results/intruders)")
    parser.add_argument("--smoke", action="store_true", help="4 steps, 200 examples, ranks 1 and 8, one task")
    args = parser.parse_args(argv)
    args.groups = [args.group] if args.group else list(GROUPS)
    args.tasks = _names(args.tasks) if args.tasks else ([SMOKE["task"]] if args.smoke else list(suite.tasks))
    args.methods = _names(args.methods) if args.methods else list(FAMILY)
    try:
        args.ranks = [int(r) for r in _names(args.ranks)] if args.ranks else list(SMOKE["ranks"] if args.smoke else RANKS)
    except ValueError:
        parser.error(f"--ranks takes comma-separated integers, e.g. 1,8; got {args.ranks!r}")
    unknown = sorted(set(args.tasks) - set(suite.tasks)) + sorted(set(args.methods) - set(FAMILY))
    if unknown or args.workers < 1 or args.threads < 1 or any(r < 1 for r in args.ranks):
        parser.error(f"unknown task(s) or method(s) {unknown}, or a count below 1; tasks: {', '.join(suite.tasks)}; "
                     f"methods: {', '.join(FAMILY)}")
    smoke_root = pathlib.Path("/tmp/intruders-smoke")
    args.runs = args.runs or str(smoke_root / "runs" if args.smoke else ROOT / "runs" / "intruders")
    args.out = args.out or str(smoke_root / "results" if args.smoke else ROOT / "bench" / "results" / "intruders")
    return args


def main(argv: list[str] | None = None) -> int:
    from peftlab.bench import suite as suites
    from peftlab.io import files

    suite = suites.load(SUITE)
    args = arguments(argv, suite)
    runs, out = pathlib.Path(args.runs), pathlib.Path(args.out)
    targets = list(suite.method_fields["targets"])
    entries = plan(args, suite)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:  # each run is its own process
        records = list(pool.map(lambda e: run_entry(e, runs, args.threads, targets, args.smoke), entries))
    for record in records:
        result = (f"{record['intruders']['targets']} intruders, test accuracy {record['test_accuracy']:.4f}"
                  if record["status"] == "ok" else f"{record['status']} ({record.get('log') or record.get('error')})")
        print(f"{record['name']}: {result}")
    out.mkdir(parents=True, exist_ok=True)
    setup = {"suite": SUITE, "seed": suite.seeds[0], "k": K, "threshold": THRESHOLD, "lora_alpha": LORA_ALPHA,
             "ranks": args.ranks, "tasks": args.tasks, "groups": args.groups, "targets": targets, "smoke": args.smoke}
    files.write_json(out / "results.json", {"setup": setup, "runs": records})
    files.write_text(out / "report.md", report(records, args.tasks, args.ranks, args.smoke))
    if any(r["status"] == "ok" and r["method"] == "lora" for r in records):
        plot_ranks(records, args.tasks, out / "intruders.png")
    if any(r["status"] == "ok" and r["group"] == "family" for r in records):
        plot_family(records, args.tasks, out / "intruders_family.png")
    print(f"results, report and figures in {out}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
