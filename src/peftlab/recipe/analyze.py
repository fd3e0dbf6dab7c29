"""`peftlab analyze RUN_DIR [--against RUN_DIR]`: what a finished run did to its weights.

    pairs = weight_pairs(run_dir)              {layer: (W0, W)} of every linear layer it changed
    report = analyze_run(run_dir, against=...) intruder dimensions, spectra of W - W0, and (with
                                               another run) the subspace similarity of the changes

The tuned weights are the run's model with its adapter merged (detach(keep_merged=True)), so
every method with a weight form (and full fine-tuning, and methods trained in place) is seen
the same way; W0 comes from a fresh load of the run's base model. The task head is left out (it
starts random, so it has no base to compare with). Results go to RUN_DIR/analysis/:
analysis.json, spectra.png, intruders.png and, with --against, similarity.png.
"""
from __future__ import annotations

import io as bytes_io
import pathlib
from typing import Any

from torch import Tensor

from . import models
from .rundir import read_run
from .runs import load_trained
from ..analysis import check_settings, intruder_report, similarity_grid, spectrum
from ..core import adapter_configs, detach
from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE, host_kind
from ..io import files

OUTPUT = "analysis"


def _linear_weights(model, skip: str | None) -> dict[str, Tensor]:
    found = {}
    for name, module in model.named_modules():
        kind = host_kind(module)
        if kind is None or kind.name not in LINEAR_LIKE or (skip and (name == skip or name.startswith(skip + "."))):
            continue
        found[name] = kind.matrix(module).detach()
    return found


def weight_pairs(run_dir: str | pathlib.Path) -> dict[str, tuple[Tensor, Tensor]]:
    """{layer: (base weight, tuned weight)} as (out, in) for the linear layers the run changed."""
    read_run(run_dir)  # a folder that is no run fails here, naming it
    model, _, run, task = load_trained(run_dir)
    method = run.method["name"]
    if adapter_configs(model):
        try:
            detach(model, keep_merged=True)
        except PeftlabError as err:
            raise PeftlabError(f"run {run_dir} ({method}) has no weight change to analyse: {err}") from None
    base, _ = models.load(run.model, task["kind"], task["label_names"])
    head = models.head_name(base) if task["kind"] == "classification" else None
    tuned, original = _linear_weights(model, head), _linear_weights(base, head)
    pairs = {n: (original[n], w) for n, w in tuned.items() if n in original and not original[n].equal(w)}
    if not pairs:
        raise PeftlabError(f"run {run_dir} ({method}) changed no linear layer's weight (outside the task head), so "
                           "there is nothing to analyse: analyse a run of a method that changes weights")
    return pairs


def analyze_run(run_dir: str | pathlib.Path, against: str | pathlib.Path | None = None, k: int = 10,
                threshold: float = 0.5, echo=print) -> dict[str, Any]:
    """Writes RUN_DIR/analysis/ and returns what analysis.json holds."""
    run_dir = pathlib.Path(run_dir)
    check_settings(k, threshold)  # before anything loads
    pairs = weight_pairs(run_dir)
    other = weight_pairs(against) if against is not None else None
    report: dict[str, Any] = {"run": str(run_dir), "intruders": intruder_report(pairs, k, threshold),
                              "spectra": {n: spectrum(w - w0) for n, (w0, w) in pairs.items()}}
    if other is not None:
        shared = [n for n in pairs if n in other and other[n][0].shape == pairs[n][0].shape]
        if not shared:
            raise PeftlabError(f"--against {against}: no changed layer in common with {run_dir}; compare runs of "
                               "the same base model")
        report["against"] = str(against)
        report["similarity"] = {n: similarity_grid(pairs[n][1] - pairs[n][0], other[n][1] - other[n][0])
                                for n in shared}
    _write(run_dir / OUTPUT, report)
    echo(_summary_line(report) + f"; written to {run_dir / OUTPUT}")
    return report


def _summary_line(report: dict[str, Any]) -> str:
    intruders, spectra = report["intruders"], report["spectra"]
    mean = lambda key: sum(s[key] for s in spectra.values()) / len(spectra)
    line = (f"{len(spectra)} changed layers: {intruders['total']} intruder dimensions (top {intruders['k']}, "
            f"|cos| < {intruders['threshold']}), mean effective rank {mean('effective_rank'):.2f}, "
            f"mean stable rank {mean('stable_rank'):.2f}")
    if "similarity" in report:
        top = [grid[-1][-1] for grid in report["similarity"].values()]
        line += f", mean subspace similarity to --against {sum(top) / len(top):.3f}"
    return line


def _write(folder: pathlib.Path, report: dict[str, Any]) -> None:
    with files.new_directory(folder) as scratch:
        files.write_json(scratch / "analysis.json", report)
        for name, figure in _figures(report).items():
            files.write_bytes(scratch / name, figure)


def png(figure) -> bytes:
    """A matplotlib figure as PNG bytes (closed afterwards), for files.write_bytes."""
    import matplotlib.pyplot as plt

    buffer = bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _figures(report: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in report["spectra"].items():
        ax.semilogy(range(1, len(s["singular_values"]) + 1), s["singular_values"], lw=0.8, alpha=0.7)
    ax.set_xlabel("index"), ax.set_ylabel("singular value of W - W0 (log)")
    ax.set_title(f"spectra of the weight changes ({len(report['spectra'])} layers)")
    figures["spectra.png"] = png(figure)
    intruders = report["intruders"]
    figure, ax = plt.subplots(figsize=(7, max(3, 0.18 * len(intruders["per_matrix"]))))
    names = list(intruders["per_matrix"])
    ax.barh(range(len(names)), [intruders["per_matrix"][n] for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=6), ax.invert_yaxis()
    ax.set_xlabel(f"intruder dimensions among the top {intruders['k']} (|cos| < {intruders['threshold']})")
    figures["intruders.png"] = png(figure)
    if "similarity" in report:
        grids = list(report["similarity"].values())
        mean = [[sum(g[i][j] for g in grids) / len(grids) for j in range(len(grids[0]))] for i in range(len(grids[0]))]
        figure, ax = plt.subplots(figsize=(4.5, 4))
        shown = ax.imshow(mean, vmin=0, vmax=1, cmap="viridis", origin="lower",
                          extent=(0.5, len(mean) + 0.5, 0.5, len(mean) + 0.5))
        figure.colorbar(shown, ax=ax)
        ax.set_xlabel("j (--against)"), ax.set_ylabel("i (this run)")
        ax.set_title("phi(i, j), mean over layers")
        figures["similarity.png"] = png(figure)
    return figures
