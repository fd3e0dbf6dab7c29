"""The command line: `peftlab train | eval | merge | export | methods | bench`.

    peftlab train [CONFIG.yaml] [--set key=value ...] [--output DIR] [--resume [RUN_DIR]] [--overwrite]
    peftlab eval RUN_DIR [--data TASK_OR_FILE] [--split test|validation|train]
    peftlab merge RUN_DIR --out DIR
    peftlab export RUN_DIR --format peft --out DIR
    peftlab methods
    peftlab bench SUITE ... | bench report SUITE [--embed PAGE]     (see peftlab.bench)

Bad input ends with one line, `error: <what is wrong and how to fix it>`, and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import PeftlabError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning: train, "
                                     "evaluate, merge and export adapters.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a method on a task (no config: the embedded default job)")
    train.add_argument("config", nargs="?", help="a YAML run config; omitted: the default job")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set train.batch_size=16 (repeatable)")
    train.add_argument("--output", help="the run directory (same as --set output=DIR)")
    train.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                       help="continue from the newest checkpoint (of RUN_DIR, or of the config's output)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in the output directory")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and stop")

    evaluate = commands.add_parser("eval", help="evaluate a trained run on its test split or other data")
    evaluate.add_argument("run", help="a run directory written by peftlab train")
    evaluate.add_argument("--data", help="a task name or a .csv/.jsonl file (default: the run's own task)")
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test", "all"),
                          help="which split of a named task (a file is used whole)")

    merge = commands.add_parser("merge", help="write the adapted model as a plain transformers checkpoint")
    merge.add_argument("run", help="a run directory written by peftlab train")
    merge.add_argument("--out", required=True, help="the directory to write")

    export = commands.add_parser("export", help="write the run's adapter in another format")
    export.add_argument("run", help="a run directory written by peftlab train")
    export.add_argument("--format", required=True, choices=("peft", "peftlab"))
    export.add_argument("--out", required=True, help="the directory to write")

    commands.add_parser("methods", help="list the registered methods and their trainable parameters")

    # `peftlab bench`: the method comparison lives in peftlab.bench; this only wires it in.
    from .bench import add_arguments as bench_arguments

    bench_arguments(commands.add_parser("bench", help="compare methods: run a suite (bench/suites/*.yaml), "
                                        "or `bench report SUITE`"))
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # the per-tensor "Loading weights" bar; training keeps its own


def cmd_train(args: argparse.Namespace) -> int:
    from .recipe import config, rundir, trainer as train

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output={args.output}")
    base = None
    if args.resume:  # a run named by its directory: its saved config is the base (rundir decides the rest)
        base = rundir.resumed_config(args.resume)
        overrides.append(f"output={args.resume}")
    run = config.build(args.config, overrides, base=base)
    if args.print_config:
        print(run.to_yaml(), end="")
        return 0
    _quiet_libraries()
    train.train(run, resume=args.resume is not None, overwrite=args.overwrite)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import _ALIASES, method_class, methods

    rows = []
    for name in methods():
        cls = method_class(name)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        about = doc[0] if doc else cls.__name__
        if name in _ALIASES:
            preset = ", ".join(f"{k}={v!r}" for k, v in _ALIASES[name][1].items())
            about = f"{cls.method} with {preset}"
        rows.append((name, about, cls.trainable_formula or "-"))
    width = max(len(r[0]) for r in rows)
    print(f"{'method'.ljust(width)}  what it is  [trainable parameters]")
    for name, about, formula in rows:
        print(f"{name.ljust(width)}  {about}  [{formula}]")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .recipe import runs

    runs.evaluate(args.run, data_source=args.data, split=args.split)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .recipe import runs

    runs.merge_run(args.run, args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .recipe import runs

    runs.export_run(args.run, args.out, args.format)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .bench import run_from_args

    return run_from_args(args)


COMMANDS = {"bench": cmd_bench, "train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "export": cmd_export, "methods": cmd_methods}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the newest checkpoint is complete; continue with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
