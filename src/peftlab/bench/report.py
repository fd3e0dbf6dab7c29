"""The bench report: one Markdown page and two plots from a suite's result records.

    write_report(suite, results_dir) -> path of report.md

Only final runs count (selection runs only decide learning rates). Each number is the mean
+- standard deviation over the seeds (sample std, n-1; a single seed shows the mean alone).
The score is the test split's version of the suite's selection metric: test accuracy for
classification suites, test answer loss for causal-LM suites (lower is better).

Plots (matplotlib, one panel per task): the score against trainable parameters, with the
Pareto front (no other method is both smaller and better), and against training time.

Measured columns, printed for a task when one of its records has them ("—" where a record does
not: records from before they were measured stay valid): `init s` (building the adaptation,
data-driven initialisation included, outside the training time), `to 95%` (the first in-training
validation whose accuracy reaches 95% of the last one's: its step and wall seconds since training
started; runs with train.eval_every) and the latency per evaluation batch unmerged / merged / with
the adapters off (execute.py measures it).
"""
from __future__ import annotations

import math
import os
import pathlib
import statistics
from collections import defaultdict
from typing import Any

from ..io import files
from ..registry import config as method_config
from .runner import metric_value, read_invocations, read_records
from .suite import BASELINES, Suite
from .tuned import selection_notes

PLOT_PARAMS = "score_vs_trainable_parameters.png"
PLOT_TIME = "score_vs_training_time.png"


# ---- aggregation -------------------------------------------------------------------------------


def score_metric(suite: Suite) -> tuple[str, str]:
    """('test.accuracy', 'max') from select = validation.accuracy, max."""
    name = suite.select["metric"].split(".", 1)[1]
    return f"test.{name}", suite.select["mode"]


def _stats(values: list[float]) -> tuple[float, float | None] | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _product(a: float | None, b: float | None) -> float | None:
    return a * b if a is not None and b is not None else None


def aggregate(records: list[dict[str, Any]], suite: Suite) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(task, method, implementation) -> mean/std of every reported quantity over the seeds."""
    metric, _ = score_metric(suite)
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for r in records:
        if r.get("phase") == "final" and r.get("status") == "ok":
            groups[(r["task"], r["method"], r["implementation"])].append(r)
    table = {}
    for key, runs in groups.items():
        table[key] = {
            "seeds": sorted(r["seed"] for r in runs),
            "score": _stats([metric_value(r, metric) for r in runs]),
            "trainable": _stats([r.get("trainable_parameters") for r in runs]),
            "share": _stats([r.get("trainable_share") for r in runs]),
            "train_time": _stats([r.get("train_time_s") for r in runs]),
            "train_cpu": _stats([r.get("train_cpu_time_s") or _product(r.get("cpu_s_per_step"), r.get("steps"))
                                 for r in runs]),
            "s_per_step": _stats([r.get("s_per_step") for r in runs]),
            "cpu_s_per_step": _stats([r.get("cpu_s_per_step") for r in runs]),
            "rss": _stats([r.get("peak_rss_mb") for r in runs]),
            "adapter": _stats([r.get("adapter_bytes") for r in runs]),
            "forgetting": _stats([(r.get("forgetting") or {}).get("delta") for r in runs]),
            **_measured(runs),
            "steps": _stats([r.get("steps") for r in runs]),
            "lr": runs[0].get("lr"),
            "selection": runs[0].get("selection") or {},
        }
    return table


TARGET_SHARE = 0.95  # time to accuracy: the first validation at this share of the final one


def time_to_accuracy(curve: list[dict[str, Any]] | None,
                     share: float = TARGET_SHARE) -> tuple[int, float | None] | None:
    """(step, wall seconds) of the first validation whose accuracy is at least `share` x the last
    validation's; None without a curve with accuracies."""
    points = [p for p in curve or [] if isinstance(p.get("accuracy"), (int, float))]
    if not points:
        return None
    target = share * points[-1]["accuracy"]
    first = next(p for p in points if p["accuracy"] >= target)  # the last point itself qualifies
    return first["step"], first.get("wall_s")


def _measured(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std over the seeds of what execute.py measures besides training: init, time to accuracy, latency."""
    reached = [time_to_accuracy(r.get("validation_curve")) for r in runs]
    latency = [r.get("latency_ms") or {} for r in runs]
    return {"init_time": _stats([r.get("init_time_s") for r in runs]),
            "to_target_step": _stats([t[0] for t in reached if t]),
            "to_target_s": _stats([t[1] for t in reached if t]),
            **{f"latency_{kind}": _stats([ms.get(kind) for ms in latency]) for kind in ("unmerged", "merged", "base")}}


# ---- formatting --------------------------------------------------------------------------------


def display_name(method: str, records: list[dict[str, Any]]) -> str:
    """A table row's name. ALLoRA's exact coefficient is not public: its row says that this is our
    reading of the paper's abstract and which coefficient its runs used (from their configs)."""
    if method != "allora":
        return method
    fields = next((r["config"]["method"] for r in records if r.get("method") == "allora" and r.get("config")), {})
    used = method_config("allora", **{k: v for k, v in fields.items() if k != "name"})
    coefficient = "1/sqrt(‖θ‖² + 1/η²)" if used.form == "sqrt" else "1/(‖θ‖ + 1/η)"
    return f"ALLoRA (our reading of the abstract; c = {coefficient}, η = {used.eta:g}, per {used.granularity})"


def _mean_std(stat, digits: int = 3, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def _count(stat) -> str:
    if stat is None:
        return "-"
    n = stat[0]
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.{1 if n < 100 * size else 0}f}{unit}"
    return f"{n:.0f}"


def _bytes(stat) -> str:
    if stat is None:
        return "-"
    n = stat[0]
    for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _percent(stat) -> str:
    """A share of the parameters (it does not vary with the seed: no std)."""
    return "-" if stat is None else f"{100 * stat[0]:.3f}%"


MISSING = "—"  # the measured columns' cell for a record without the measurement


def _mean(stat, digits: int) -> str:
    return MISSING if stat is None else f"{stat[0]:.{digits}f}"


def _to_target(row: dict[str, Any]) -> str:
    if row["to_target_step"] is None:
        return MISSING
    return f"{row['to_target_step'][0]:.0f} / {_mean(row['to_target_s'], 1)}"


def _latency(row: dict[str, Any]) -> str:
    parts = [row[f"latency_{kind}"] for kind in ("unmerged", "merged", "base")]
    return MISSING if all(p is None for p in parts) else " / ".join(_mean(p, 1) for p in parts)


# (header, cell, aggregate() keys that hold its data): shown when a row of the table has any of them
MEASURED_COLUMNS = (("init s", lambda row: _mean(row["init_time"], 2), ("init_time",)),
                    ("to 95% (steps / s)", _to_target, ("to_target_step",)),
                    ("latency unmerged / merged / base ms", _latency,
                     ("latency_unmerged", "latency_merged", "latency_base")))


def measured_columns(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """[(header, cell function)] of the measured columns some of these rows have data for."""
    return [(header, cell) for header, cell, keys in MEASURED_COLUMNS
            if any(row[k] is not None for row in rows for k in keys)]


MEASURED_NOTE = ("`init s`: seconds building the adaptation (attach, data-driven initialisation included; not in "
                 "the train time). `to 95%`: the first in-training validation reaching 95% of the last one's accuracy, "
                 "its step / wall seconds since training started. `latency`: ms per forward of one evaluation batch "
                 "(median of 5), unmerged / merged / adapters off; — where the method cannot merge or a record lacks it.")


def _method_order(table: dict, task: str, mode: str) -> list[str]:
    """Baselines first, then the methods by score (best first)."""
    methods = {m for (t, m, impl) in table if t == task and impl == "peftlab"}
    baselines = [b for b in BASELINES if b in methods]

    def key(m: str) -> float:
        score = table[(task, m, "peftlab")]["score"]
        if score is None:
            return math.inf
        return -score[0] if mode == "max" else score[0]

    return baselines + sorted(methods - set(baselines), key=lambda m: (key(m), m))


# ---- the page ----------------------------------------------------------------------------------


def markdown(suite: Suite, records: list[dict[str, Any]], plots: list[str],
             invocations: list[dict[str, Any]] = ()) -> str:
    metric, mode = score_metric(suite)
    table = aggregate(records, suite)
    tasks = [t for t in suite.tasks if any(k[0] == t for k in table)]
    better = "higher is better" if mode == "max" else "lower is better"
    lines = [f"# Bench: {suite.name}", ""]
    if suite.description:
        lines += [suite.description, ""]
    seeds = ", ".join(str(s) for s in suite.seeds)
    lines += [f"Score: `{metric}` ({better}), mean ± std over the seeds of the suite ({seeds}) that have "
              f"finished (column `seeds`). Time and memory are per run on the machine named below; `s/step` is "
              f"training wall time / optimizer steps.", ""]
    has_forgetting = any(v["forgetting"] is not None for v in table.values())
    for task in tasks:
        lines += [f"## {task}", ""]
        probe = table.get((task, "head-only", "peftlab"), {}).get("score")
        header = ["method", metric, "seeds", "trainable", "share", "train time (s)", "s/step", "CPU s/step",
                  "peak RSS (MB)", "adapter file", "lr"]
        if probe:
            header.insert(2, "vs head-only")
        if has_forgetting:
            header.insert(2, "forgetting (Δ loss)")
        measured = measured_columns([table[(task, m, "peftlab")] for m in _method_order(table, task, mode)])
        header += [name for name, _ in measured]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in _method_order(table, task, mode):
            row = table[(task, method, "peftlab")]
            cells = [f"**{method}**" if method in BASELINES else display_name(method, records), _mean_std(row["score"]),
                     ",".join(map(str, row["seeds"])), _count(row["trainable"]), _percent(row["share"]),
                     _mean_std(row["train_time"], 0), _mean_std(row["s_per_step"], 3),
                     _mean_std(row["cpu_s_per_step"], 3), _mean_std(row["rss"], 0), _bytes(row["adapter"]),
                     f"{row['lr']:g}" if row["lr"] else "-"]
            if probe:
                cells.insert(2, "-" if method == "head-only" or not row["score"]
                             else f"{row['score'][0] - probe[0]:+.3f}")
            if has_forgetting:
                cells.insert(2, _mean_std(row["forgetting"], 3))
            lines.append("| " + " | ".join(cells + [cell(row) for _, cell in measured]) + " |")
        lines.append("")
        if probe:
            lines += ["`vs head-only`: the mean score minus the linear probe's (the classifier alone trained).", ""]
        lines += [MEASURED_NOTE, ""] if measured else []
        lines += _peer_table(table, task, metric)
    lines += [f"![score vs trainable parameters]({p})" for p in plots[:1]]
    lines += ["", *[f"![score vs training time]({p})" for p in plots[1:2]], ""]
    lines += _grid_section(suite, table)
    lines += _unused_selection_runs(records, table)
    lines += _failures(records)
    lines += _excluded(suite)
    lines += _setup(suite, records, invocations)
    return "\n".join(lines).rstrip() + "\n"


def _peer_table(table: dict, task: str, metric: str) -> list[str]:
    pairs = sorted(m for (t, m, impl) in table if t == task and impl == "peft" and (t, m, "peftlab") in table)
    if not pairs:
        return []
    lines = ["Side by side with `peft` (same model, data, seed, hyperparameters and learning rate). The step-time "
             "ratio is peftlab / peft in CPU seconds per step, which a busy machine disturbs less than wall time:", "",
             f"| method | {metric} peftlab | {metric} peft | s/step peftlab | s/step peft | CPU s/step peftlab "
             "| CPU s/step peft | step time ratio | peak RSS peftlab (MB) | peak RSS peft (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = [row for m in pairs for row in (table[(task, m, "peftlab")], table[(task, m, "peft")])]
    with_latency = any(_latency(row) != MISSING for row in rows)
    if with_latency:  # the latency of each, unmerged / merged / adapters off
        lines[-2] += " latency peftlab (ms) | latency peft (ms) |"
        lines[-1] += "---|---|"
    for method in pairs:
        ours, theirs = table[(task, method, "peftlab")], table[(task, method, "peft")]
        ratio = "-"
        if ours["cpu_s_per_step"] and theirs["cpu_s_per_step"]:
            ratio = f"{ours['cpu_s_per_step'][0] / theirs['cpu_s_per_step'][0]:.2f}x"
        lines.append(f"| {method} | {_mean_std(ours['score'])} | {_mean_std(theirs['score'])} | "
                     f"{_mean_std(ours['s_per_step'], 3)} | {_mean_std(theirs['s_per_step'], 3)} | "
                     f"{_mean_std(ours['cpu_s_per_step'], 3)} | {_mean_std(theirs['cpu_s_per_step'], 3)} | {ratio} | "
                     f"{_mean_std(ours['rss'], 0)} | {_mean_std(theirs['rss'], 0)} |"
                     + (f" {_latency(ours)} | {_latency(theirs)} |" if with_latency else ""))
    return lines + [""]


def _grid_section(suite: Suite, table: dict) -> list[str]:
    lines = ["## Learning rates", "",
             f"Chosen per method and task from the grid below on `{suite.select['metric']}` "
             f"({suite.select['mode']}), with seed {suite.seeds[0]}; ties go to the lower validation loss (marked ~ below). "
             "The test split is used once, by each final run. "
             f"Default grid: {', '.join(f'{x:g}' for x in suite.lr['default'])}."]
    if suite.lr_extend:
        lines.append(f"Where the best rate was the grid's largest or smallest, up to {suite.lr_extend} rates were "
                     "added past that end, one step of the grid's ratio at a time (marked * below).")
    special = {m: g for m, g in suite.lr.items() if m != "default"}
    if special:
        lines.append("Own grids: " + "; ".join(f"{m}: {', '.join(f'{x:g}' for x in g)}" for m, g in special.items())
                     + ".")
    lines += selection_notes(suite)  # which selection each task used, when not the suite's grid alone
    chosen = [(t, m, v["selection"]) for (t, m, impl), v in sorted(table.items())
              if impl == "peftlab" and v["selection"].get("scores")]
    if chosen:
        lines += ["", "| task | method | validation scores by lr | chosen |", "|---|---|---|---|"]
        for task, method, selection in chosen:
            by_rate = sorted(selection["scores"].items(), key=lambda item: float(item[0]))
            added = {f"{lr:g}" for lr in selection.get("added", [])}
            scores = ", ".join(f"{lr}{'*' if lr in added else ''}: {s:.4f}" for lr, s in by_rate)
            tie = "~" if "tie_broken_by" in selection else ""
            lines.append(f"| {task} | {method} | {scores} | {selection['chosen']:g}{tie} |")
    else:
        lines += ["", "Every grid here has one rate, so no selection runs were needed."]
    return lines + [""]


def _unused_selection_runs(records: list[dict[str, Any]], table: dict) -> list[str]:
    """Selection records that no final run's choice includes: left by an earlier grid or tie rule."""
    unused = []
    for r in records:
        if r.get("phase") != "select" or r.get("status") != "ok":
            continue
        final = table.get((r.get("task"), r.get("method"), r.get("implementation", "peftlab")))
        scores = final["selection"].get("scores", {}) if final else {}
        if scores and not any(math.isclose(float(lr), r["lr"], rel_tol=1e-9) for lr in scores):
            unused.append(r["run"])
    if not unused:
        return []
    return ["## Unused selection runs", "",
            "These selection records are in the results directory, but no final run's learning-rate choice "
            "includes them (an earlier grid or selection rule ran them); they count nowhere in this report, "
            "and deleting them changes nothing: " + ", ".join(f"`{run}`" for run in sorted(unused)) + ".", ""]


def _failures(records: list[dict[str, Any]]) -> list[str]:
    failed = [r for r in records if r.get("status") == "failed"]
    if not failed:
        return []
    lines = ["## Failed runs", "", "| run | error |", "|---|---|"]
    for r in failed:
        error = str(r.get("error", "")).splitlines()[0].replace("|", "\\|")[:300]
        lines.append(f"| {r['run']} | {error} |")
    return lines + [""]


def _excluded(suite: Suite) -> list[str]:
    if suite.methods != "all" or not suite.exclude:
        return []
    lines = ["## Left out", ""]
    lines += [f"- {m}: {why or 'excluded by the suite'}" for m, why in sorted(suite.exclude.items())]
    return lines + [""]


def _setup(suite: Suite, records: list[dict[str, Any]], invocations) -> list[str]:
    ok = [r for r in records if r.get("status") == "ok" and r.get("phase") == "final"]
    lines = ["## Setup", ""]
    if ok:
        versions = ok[-1].get("versions", {})
        machine = ok[-1].get("machine", {})
        if versions:
            lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())
                                                  if k not in ("machine", "cpus")) + ".")
        if machine:
            lines.append(f"Machine: {machine.get('platform', '?')}, {machine.get('cpus', '?')} CPUs; "
                         f"torch threads per run: {machine.get('torch_threads', '?')}; runs at once: "
                         f"{ok[-1].get('concurrent_runs', 1)}.")
        loads = [r["machine"].get("load_average_before") for r in ok if r.get("machine")]
        loads = [x for x in loads if x is not None]
        if loads:
            lines.append(f"1-minute load average when runs started: {min(loads):.1f} to {max(loads):.1f} "
                         "(the runs shared the machine; time and step figures include that).")
        total = sum(r.get("bench_time_s", 0) for r in records)
        cpu = sum(r.get("cpu_time_s") or 0 for r in records)
        lines.append(f"Sum of the recorded runs' times: {total / 60:.1f} min (CPU time: {cpu / 60:.1f} min).")
    for entry in invocations[-3:]:
        lines.append(f"Bench invocation {entry['started']}: {entry['runs']} of {entry['planned']} runs in "
                     f"{entry['wall_time_s'] / 60:.1f} min wall time, {entry['workers']} at once, 1-minute load "
                     f"average {entry['load_average_start']} at the start, {entry['load_average_end']} at the end.")
    if suite.path is not None:
        lines.append(f"Suite file: `{suite.path.name}`; every run's resolved config is in its record.")
    return lines + [""]


# ---- plots -------------------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float, str]], mode: str) -> list[tuple[float, float, str]]:
    """Points that no other point beats on both axes: fewer (x) and better (y)."""
    front, best = [], None
    for x, y, label in sorted(points, key=lambda p: (p[0], -p[1] if mode == "max" else p[1])):
        if best is None or (y > best if mode == "max" else y < best):
            front.append((x, y, label))
            best = y
    return front


def spread_labels(positions: list[float], gap: float, low: float = 0.02, high: float = 0.98) -> list[float]:
    """Moves label heights (axes fractions) apart until neighbours are at least `gap` apart.

    Keeps their order and, where the bounds allow, their mean: a cluster of methods with the
    same size and nearly the same score gets a readable column of labels centred on it.
    """
    if not positions:
        return []
    order = sorted(range(len(positions)), key=lambda i: positions[i])
    ys = [positions[i] for i in order]
    gap = min(gap, (high - low) / max(len(ys) - 1, 1))
    for _ in range(500):
        moved = False
        for i in range(len(ys) - 1):
            short = gap - (ys[i + 1] - ys[i])
            if short > 1e-9:
                ys[i] -= short / 2
                ys[i + 1] += short / 2
                moved = True
        shift = max(low - ys[0], 0.0) + min(high - ys[-1], 0.0)
        ys = [y + shift for y in ys]
        if not moved:
            break
    placed = [0.0] * len(ys)
    for rank, i in enumerate(order):
        placed[i] = ys[rank]
    return placed


def label_heights(fractions: list[tuple[float, float]], gap: float, width: float = 0.12) -> list[float]:
    """The height (axes fraction) of each point's label, for points at (x, y) axes fractions: labels
    are `width` of the axes wide, so points nearer than that on x compete for the same rows and
    their labels are spread apart vertically (spread_labels)."""
    order = sorted(range(len(fractions)), key=lambda i: fractions[i][0])
    clusters: list[list[int]] = []
    for i in order:
        if clusters and fractions[i][0] - fractions[clusters[-1][-1]][0] < width:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    heights = [0.0] * len(fractions)
    for cluster in clusters:
        for i, height in zip(cluster, spread_labels([fractions[i][1] for i in cluster], gap=gap)):
            heights[i] = height
    return heights


def _label_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Names each point; labels whose points sit close together on x are spread out vertically
    and joined to their points by a thin line."""
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()
    fractions = [tuple(to_axes.transform((x, y))) for x, y, _ in points]
    heights = label_heights(fractions, gap=0.032)
    for i in sorted(range(len(points)), key=lambda i: fractions[i][0]):  # left to right, as drawn before
        (x, y, label), (fx, fy), height = points[i], fractions[i], heights[i]
        moved = abs(height - fy) > 0.01
        ax.annotate(label, (x, y), xytext=(fx + 0.015, height), textcoords="axes fraction",
                    fontsize=7, va="center",
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="0.55") if moved else None)


def plot(suite: Suite, records: list[dict[str, Any]], out_dir: pathlib.Path) -> list[str]:
    """Writes the two figures; returns their file names (relative to out_dir)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, mode = score_metric(suite)
    table = aggregate(records, suite)
    tasks = [t for t in suite.tasks if any(k[0] == t and v["score"] for k, v in table.items())]
    if not tasks:
        return []
    written = []
    # Time is CPU seconds of the training loop: on a shared machine wall time mostly measures the
    # neighbours; with one torch thread per run it equals wall time on an idle core.
    for filename, quantity, xlabel in ((PLOT_PARAMS, "trainable", "trainable parameters (log scale)"),
                                       (PLOT_TIME, "train_cpu", "training time, CPU seconds")):
        figure, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            shown = {m: v for (t, m, impl), v in table.items()
                     if t == task and impl == "peftlab" and v["score"] and v[quantity] and v[quantity][0] > 0}
            points = [(v[quantity][0], v["score"][0], m) for m, v in shown.items()]
            for x, y, label in points:
                ax.scatter(x, y, s=28, color="tab:red" if label in BASELINES else "tab:blue", zorder=3)
            spread = [(v[quantity][0], *v["score"]) for v in shown.values() if v["score"][1]]
            if spread:  # +- one standard deviation over the seeds
                xs, ys, errors = zip(*spread)
                ax.errorbar(xs, ys, yerr=errors, fmt="none", ecolor="0.6", elinewidth=0.8, capsize=2, zorder=2)
            peers = [(v[quantity][0], v["score"][0]) for (t, m, impl), v in table.items()
                     if t == task and impl == "peft" and v["score"] and v[quantity] and v[quantity][0] > 0]
            if peers:
                ax.scatter(*zip(*peers), s=40, facecolors="none", edgecolors="tab:gray", zorder=2, label="peft")
            front = pareto_front(points, mode)
            if quantity == "trainable" and len(front) > 1:
                ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="tab:green",
                        linewidth=1.2, label="Pareto front", zorder=1)
            xs = [p[0] for p in points]
            if quantity == "trainable" or (xs and max(xs) > 10 * min(xs)):
                ax.set_xscale("log")
                xlabel = xlabel if "log" in xlabel else f"{xlabel} (log scale)"
            _label_points(ax, points)  # after the scales are set: labels are placed in axes fractions
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{metric} ({'higher' if mode == 'max' else 'lower'} is better)")
            ax.set_title(task)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="best")
        finished = sorted({seed for v in table.values() for seed in v["seeds"]})
        figure.suptitle(f"bench {suite.name}: mean over seeds {', '.join(map(str, finished))}"
                        + (" (bars: +- 1 std)" if len(finished) > 1 else ""))
        figure.tight_layout()
        figure.savefig(out_dir / filename, dpi=110)
        plt.close(figure)
        written.append(filename)
    return written


def embed(page: pathlib.Path, suite: Suite, report: pathlib.Path) -> None:
    """Copy the report's per-task tables into `page` between two marker lines.

    The markers are `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (NAME: the suite's name);
    what lies between them is replaced, the rest of the page is left as it is. Links in the
    copied text are made relative to the page.
    """
    from ..errors import PeftlabError

    start, end = f"<!-- bench:{suite.name} -->", f"<!-- /bench:{suite.name} -->"
    text = page.read_text(encoding="utf-8")
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise PeftlabError(f"{page} needs the marker lines {start} and {end} (once each, in that order) "
                           "around the place the tables go")
    tables, keep = [], False
    for line in report.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            keep = line[3:] in suite.tasks
            line = "#" + line  # one level down inside the page's own section
        if keep:
            tables.append(line)
    prefix = pathlib.Path(os.path.relpath(report.parent.resolve(), page.parent.resolve())).as_posix()
    body = "\n".join(tables).replace("](", f"]({prefix}/").strip()
    head, rest = text.split(start)
    tail = rest.split(end)[1]
    files.write_text(page, f"{head}{start}\n{body}\n{end}{tail}")


def write_report(suite: Suite, results_dir: pathlib.Path) -> pathlib.Path:
    records = read_records(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    plots = plot(suite, records, results_dir)
    path = results_dir / "report.md"
    files.write_text(path, markdown(suite, records, plots, read_invocations(results_dir)))
    return path
