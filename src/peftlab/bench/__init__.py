"""`peftlab bench`: methods x tasks x seeds, each an ordinary training run, and one report.

    peftlab bench SUITE [--methods a,b] [--tasks t] [--seeds 0,1] [--only TEXT] [--no-peers]
                        [--workers N] [--dry-run] [--executor ray|fork] [--address ray://HOST:PORT|auto]
    peftlab bench report SUITE [--embed PAGE] [--html]
    python -m peftlab.bench ...            (the same, without the peftlab command)

SUITE is a name in bench/suites/ (quick, standard, lm) or the path of a suite .yaml file.
Results go to bench/results/<suite>/<run>.json, run directories to runs/bench/<suite>/<run>/,
and the report to bench/results/<suite>/report.md with its plots (with --html, also report.html).

The pieces: suite.py (the YAML schema and the plan of jobs), runner.py (the resumable loop,
records, learning-rate selection, progress line), execute.py (one real run in a child
process), report.py (the Markdown table and plots), html.py (the same as one HTML page with tabs
and switchable Pareto plots), and ../recipe/peer.py (the `peft` runs).
"""
from __future__ import annotations

import argparse
import pathlib

from .html import write_html
from .report import embed, write_report
from .runner import run_suite
from .suite import Job, Suite, load, plan

__all__ = ["Job", "Suite", "add_arguments", "embed", "load", "main", "plan", "results_dir_of", "run_from_args", "run_suite",
           "write_html", "write_report"]


def results_dir_of(suite: Suite) -> pathlib.Path:
    """bench/results/<name> beside bench/suites/; for a suite file elsewhere, ./bench/results/<name>."""
    if suite.path is not None and suite.path.resolve().parent.name == "suites":
        return suite.path.resolve().parent.parent / "results" / suite.name
    return pathlib.Path("bench") / "results" / suite.name


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _seeds(text: str | None) -> list[int] | None:
    from ..errors import PeftlabError

    try:
        return [int(t) for t in _names(text)] if text else None
    except ValueError:
        raise PeftlabError(f"--seeds takes comma-separated integers, e.g. --seeds 0,1; got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("words", nargs="+", metavar="SUITE",
                        help="a suite name (quick, standard, lm) or .yaml path; `report SUITE` only writes the report")
    parser.add_argument("--methods", help="only these methods (comma-separated registry names or baselines)")
    parser.add_argument("--tasks", help="only these tasks (comma-separated)")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="only runs whose name starts with TEXT (repeatable), e.g. --only lora-- or --only dora--sms")
    parser.add_argument("--seeds", help="only the final runs of these seeds (comma-separated), e.g. --seeds 0")
    parser.add_argument("--no-peers", action="store_true", help="leave out the `peft` peer runs")
    parser.add_argument("--workers", type=int, help="runs at once, each in its own process (default: the suite's)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default: the suite's)")
    parser.add_argument("--executor", choices=("ray", "fork"),
                        help="each run a Ray task (the default when ray is installed) or a forked child process")
    parser.add_argument("--address", metavar="ray://HOST:PORT|HOST:PORT|auto",
                        help="run on an existing Ray cluster (default: a local Ray instance started for the bench)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs that would run, run none")
    parser.add_argument("--results", help="the results directory (default: bench/results/<suite>)")
    parser.add_argument("--runs", help="where run directories go (default: runs/bench/<suite>)")
    parser.add_argument("--no-report", action="store_true", help="do not write the report after running")
    parser.add_argument("--embed", metavar="PAGE",
                        help="also copy the report's tables into PAGE (e.g. docs/findings.md) between the lines "
                             "<!-- bench:SUITE --> and <!-- /bench:SUITE -->")
    parser.add_argument("--html", action="store_true",
                        help="also write bench/results/<suite>/report.html: one self-contained page with the "
                             "tables, a tab per task and Pareto plots against parameters, memory and time")


def run_from_args(args: argparse.Namespace) -> int:
    from ..errors import PeftlabError

    words = list(args.words)
    report_only = words[0] == "report"
    if report_only:
        words = words[1:]
    if len(words) != 1:
        raise PeftlabError("give one suite: `peftlab bench SUITE` or `peftlab bench report SUITE`")
    suite = load(words[0])
    results = pathlib.Path(args.results) if args.results else results_dir_of(suite)
    if not report_only:
        runs = pathlib.Path(args.runs) if args.runs else pathlib.Path("runs") / "bench" / suite.name
        run_suite(suite, results, runs, methods=_names(args.methods), tasks=_names(args.tasks), only=args.only,
                  seeds=_seeds(args.seeds), peers=not args.no_peers, dry_run=args.dry_run, workers=args.workers,
                  threads=args.threads, executor=args.executor or "auto", address=args.address)
        if args.dry_run or args.no_report:
            return 0
    path = write_report(suite, results)
    print(f"report written to {path}")
    if args.html:
        print(f"results page written to {write_html(suite, results)}")
    if args.embed:
        embed(pathlib.Path(args.embed), suite, path)
        print(f"its tables copied into {args.embed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import sys

    from ..errors import PeftlabError

    parser = argparse.ArgumentParser(prog="python -m peftlab.bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
