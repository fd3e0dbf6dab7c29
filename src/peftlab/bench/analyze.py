"""`peftlab analyze`: look inside trained adapters (see peftlab.recipe.analyze, bench/capacity.py,
bench/intrinsic_dim.py).

    peftlab analyze RUN_DIR [--against RUN_DIR] [--k 10] [--threshold 0.5]
    peftlab analyze capacity [--method M] [--task T] [--model NAME] [--set KEY=VALUE ...] [--output DIR]
                             [--start 8] [--limit 4096] [--fit-accuracy 1.0] [--resolution 0.05]
    peftlab analyze intrinsic-dim [--task T] [--model NAME] [--set KEY=VALUE ...] [--output DIR]
                                  [--dims 16,64,...] [--fraction 0.9] [--metric accuracy] [--reference SCORE]

Each writes JSON and PNG plots (RUN_DIR/analysis/, or --output) and prints a short summary.
"""
from __future__ import annotations

import argparse
import pathlib

from ..errors import PeftlabError

SEARCHES = ("capacity", "intrinsic-dim")
# options that only one form reads: given to another form, they are a mistake, not silently ignored
ONLY = {"run": ("against", "k", "threshold"),
        "capacity": ("method", "start", "limit", "fit_accuracy", "resolution"),
        "intrinsic-dim": ("dims", "fraction", "metric", "reference")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="RUN_DIR|capacity|intrinsic-dim",
                        help="a finished run directory, or one of the searches: capacity, intrinsic-dim")
    parser.add_argument("--against", help="RUN_DIR form: another run to compare weight changes with")
    parser.add_argument("--k", type=int, help="RUN_DIR form: top singular vectors checked for intruders (10)")
    parser.add_argument("--threshold", type=float, help="RUN_DIR form: |cosine| below which a vector intrudes (0.5)")
    parser.add_argument("--method", help="capacity: the method (a registry name or full/head-only)")
    parser.add_argument("--task", help="searches: the task (default: the run config's default)")
    parser.add_argument("--model", help="searches: the base model")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="searches: a run config override for every probe run (repeatable)")
    parser.add_argument("--output", help="searches: where results and probe runs go")
    parser.add_argument("--start", type=int, help="capacity: the first n tried (8)")
    parser.add_argument("--limit", type=int, help="capacity: the largest n tried (4096)")
    parser.add_argument("--fit-accuracy", type=float, help="capacity: training accuracy that counts as fitted (1.0)")
    parser.add_argument("--resolution", type=float, help="capacity: stop bisecting within this share of n (0.05)")
    parser.add_argument("--dims", help="intrinsic-dim: candidate d values, comma-separated (16,32,...,16384)")
    parser.add_argument("--fraction", type=float, help="intrinsic-dim: share of full fine-tuning's score (0.9)")
    parser.add_argument("--metric", help="intrinsic-dim: validation metric (accuracy)")
    parser.add_argument("--reference", type=float, help="intrinsic-dim: full fine-tuning's score (skips that run)")


def _given(args: argparse.Namespace, form: str) -> dict:
    """The options of `form` that were given; refuses options of another form."""
    for other, names in ONLY.items():
        stray = [n for n in names if other != form and getattr(args, n) is not None]
        if stray:
            flag = "--" + stray[0].replace("_", "-")
            raise PeftlabError(f"{flag} belongs to `peftlab analyze {other if other != 'run' else 'RUN_DIR'}`, "
                               f"not to `peftlab analyze {form if form != 'run' else 'RUN_DIR'}`: remove it")
    return {n: getattr(args, n) for n in ONLY[form] if getattr(args, n) is not None}


def _run_overrides(args: argparse.Namespace) -> list[str]:
    named = [f"{key}={value}" for key, value in (("method.name", args.method), ("task", args.task),
                                                 ("model", args.model)) if value is not None]
    return [*named, *args.overrides]


def run_from_args(args: argparse.Namespace) -> int:
    form = args.target if args.target in SEARCHES else "run"
    given = _given(args, form)
    if form == "run":
        if args.overrides or args.output or args.task or args.model:
            raise PeftlabError("--set, --output, --task and --model belong to the searches (capacity, "
                               "intrinsic-dim); `peftlab analyze RUN_DIR` reads the run's own config")
        from ..recipe.analyze import analyze_run

        analyze_run(args.target, **given)
        return 0
    overrides = _run_overrides(args)
    out = pathlib.Path(args.output or f"runs/analyze/{form}-{args.method or 'intrinsic'}-{args.task or 'default'}")
    if form == "capacity":
        from .capacity import capacity

        capacity(overrides, out, **given)
    else:
        from .intrinsic_dim import intrinsic_dim

        if "dims" in given:
            try:
                given["dims"] = [int(d) for d in given["dims"].split(",") if d.strip()]
            except ValueError:
                raise PeftlabError(f"--dims takes comma-separated integers, e.g. --dims 64,256,1024; got "
                                   f"{args.dims!r}") from None
        intrinsic_dim(overrides, out, **given)
    return 0
