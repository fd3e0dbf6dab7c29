"""Intrinsic dimension d90 (Li et al. 2018; Aghajanyan et al. 2020): the smallest d for which
training in a random d-dimensional subspace (the `intrinsic` method, theta = theta_0 + P z)
reaches 90% of full fine-tuning's validation score.

Full fine-tuning runs once with the user's settings (or `--reference` gives its score); then
the candidate dimensions (default 2^4 ... 2^14) are bisected, assuming the score grows with d,
each probe an ordinary recipe run with method intrinsic and method.d = d.

    peftlab analyze intrinsic-dim --task movie-sentiment [--set train.epochs=3] [--dims 64,256,1024]

writes DIR/intrinsic_dim.json and DIR/intrinsic_dim.png (score against d, the 90% line), with
the runs in DIR/full/ and DIR/d<D>/.
"""
from __future__ import annotations

import pathlib
from typing import Any

from .probes import run_probe, smallest_true
from ..errors import PeftlabError
from ..io import files
from ..recipe import config, trainer

DEFAULT_DIMS = tuple(2 ** k for k in range(4, 15))


def _score(summary: dict, metric: str) -> float:
    values = summary["metrics"].get("validation", {})
    if metric not in values:
        raise PeftlabError(f"--metric {metric!r} is not among the run's validation metrics {sorted(values)}")
    return float(values[metric])


def intrinsic_dim(overrides: list[str], out: pathlib.Path, dims=DEFAULT_DIMS, fraction: float = 0.9,
                  metric: str = "accuracy", reference: float | None = None, echo=print) -> dict[str, Any]:
    """Runs the search; writes out/intrinsic_dim.json and .png; returns the report."""
    if not 0 < fraction <= 1:
        raise PeftlabError(f"--fraction must be in (0, 1], got {fraction}")
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        raise PeftlabError(f"--dims must be positive integers, e.g. --dims 64,256,1024; got {list(dims)}")
    # the user's method.* settings apply to intrinsic (after its name: a new name starts the section afresh)
    probe = lambda d: ["method.name=intrinsic", "method.targets=all-linear", *overrides, f"method.d={d}"]
    full = ["method.name=full", *(o for o in overrides if not o.startswith("method."))]
    config.build(None, full), config.build(None, probe(dims[0]))  # bad settings fail before any run
    hooks = trainer.Hooks(splits=("validation",))
    if reference is None:
        reference = _score(run_probe(full, out / "full", hooks), metric)
        echo(f"  full fine-tuning: validation {metric} {reference:.4f}")
    target = fraction * reference
    scores: dict[int, float] = {}

    def reaches(d: int) -> bool:
        scores[d] = _score(run_probe(probe(d), out / f"d{d:06d}", hooks), metric)
        echo(f"  d={d}: validation {metric} {scores[d]:.4f} (target {target:.4f})")
        return scores[d] >= target

    found, _ = smallest_true(reaches, list(dims))
    report = {"overrides": overrides, "metric": metric, "reference": reference, "fraction": fraction,
              "target": target, "d": found, "scores": {str(d): s for d, s in sorted(scores.items())}}
    _write(out, report)
    shown = f"d{round(fraction * 100)} = {found}" if found else f"no d up to {max(dims)} reaches the target"
    echo(f"intrinsic dimension: {shown} ({metric} target {target:.4f} = {fraction:g} x {reference:.4f}); "
         f"written to {out}")
    return report


def _write(out: pathlib.Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..recipe.analyze import png

    out.mkdir(parents=True, exist_ok=True)
    files.write_json(out / "intrinsic_dim.json", report)
    figure, ax = plt.subplots(figsize=(6, 4))
    points = sorted((int(d), s) for d, s in report["scores"].items())
    ax.plot(*zip(*points), marker="o", label="intrinsic (random subspace)")
    ax.axhline(report["reference"], color="tab:red", lw=0.8, label="full fine-tuning")
    ax.axhline(report["target"], color="0.5", lw=0.8, ls="--", label=f"{report['fraction']:g} x full")
    ax.set_xscale("log"), ax.set_xlabel("subspace dimension d (log)"), ax.set_ylabel(f"validation {report['metric']}")
    ax.legend()
    files.write_bytes(out / "intrinsic_dim.png", png(figure))
