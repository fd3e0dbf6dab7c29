"""The command line: `peftlab train | eval | merge | export | combine | analyze | methods | optimizers |
losses | bench`.

    peftlab train [CONFIG.yaml] [--set key=value ...] [--output DIR] [--resume [RUN_DIR]] [--overwrite]
    peftlab eval RUN_DIR [--data TASK_OR_FILE] [--split test|validation|train]
    peftlab merge RUN_DIR --out DIR
    peftlab export RUN_DIR --format peft --out DIR
    peftlab combine RUN_A RUN_B ... --method M --weights 0.6,0.4 [--density D] [--rank R] --out DIR
    peftlab methods
    peftlab optimizers
    peftlab losses
    peftlab analyze RUN_DIR [--against RUN_DIR] | analyze capacity ... | analyze intrinsic-dim ...
    peftlab bench SUITE ... | bench report SUITE [--embed PAGE] [--html]  (see peftlab.bench)

Every failure ends with one line, `error: <what is wrong, where, and how to fix it>`, never a
traceback: exit status 2 for the user's errors (bad input, a missing path, a folder that cannot
be written), 1 for faults of the machine (a full disk, an I/O error) and for bugs.
`peftlab --debug COMMAND`, `COMMAND --debug` or PEFTLAB_DEBUG=1 also print the traceback.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import threading
import traceback

from .errors import PeftlabError, failure


DEBUG_HELP = "on failure, also print the full traceback (for bug reports; same as PEFTLAB_DEBUG=1)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description="Parameter-efficient fine-tuning: train, "
                                     "evaluate, merge and export adapters.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    # where(): the path a failure is about when its error names none (a full disk names no file)
    # out_option: how the command chooses where it writes, for the fix a write failure suggests
    parser.set_defaults(where=lambda: None, out_option="--output")
    # --debug after the command as well; SUPPRESS: a command without it keeps the global value
    debug_flag = argparse.ArgumentParser(add_help=False)
    debug_flag.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, **kw) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[debug_flag], **kw)

    train = add_command("train", help="train a method on a task (no config: the embedded default job)")
    train.add_argument("config", nargs="?", help="a YAML run config; omitted: the default job")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set train.batch_size=16 (repeatable)")
    train.add_argument("--output", help="the run directory (same as --set output=DIR)")
    train.add_argument("--resume", nargs="?", const="", metavar="RUN_DIR",
                       help="continue from the newest checkpoint (of RUN_DIR, or of the config's output)")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in the output directory")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and stop")

    evaluate = add_command("eval", help="evaluate a trained run on its test split or other data")
    evaluate.add_argument("run", help="a run directory written by peftlab train")
    evaluate.add_argument("--data", help="a task name or a .csv/.jsonl file (default: the run's own task)")
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test", "all"),
                          help="which split of a named task (a file is used whole)")

    merge = add_command("merge", help="write the adapted model as a plain transformers checkpoint")
    merge.add_argument("run", help="a run directory written by peftlab train")
    merge.add_argument("--out", required=True, help="the directory to write")
    merge.set_defaults(out_option="--out")

    export = add_command("export", help="write the run's adapter in another format")
    export.add_argument("run", help="a run directory written by peftlab train")
    export.add_argument("--format", required=True, choices=("peft", "peftlab"))
    export.add_argument("--out", required=True, help="the directory to write")
    export.set_defaults(out_option="--out")

    _combine_arguments(add_command("combine", help=COMBINE_HELP))

    add_command("methods", help="list the registered methods and their trainable parameters")
    add_command("optimizers", help="list the registered optimizers (the train config's optimizer.name)")
    add_command("losses", help="list the registered losses (the train config's loss.name) and their fields")

    _bench_commands(add_command)
    return parser


def _bench_commands(add_command) -> None:
    """The commands that live in peftlab.bench (analyze, bench, tune): only wired in here."""
    from .bench.analyze import add_arguments as analyze_arguments

    analyze = add_command("analyze", help="look inside a run's weight changes (intruder dimensions, spectra, "
                          "subspace similarity), or search capacity / intrinsic-dim")
    analyze_arguments(analyze)

    # `peftlab bench`: the method comparison lives in peftlab.bench; this only wires it in.
    from .bench import add_arguments as bench_arguments

    bench_arguments(add_command("bench", help="compare methods: run a suite (bench/suites/*.yaml), "
                                        "or `bench report SUITE`"))

    from .bench.tune import add_arguments as tune_arguments

    tune_arguments(add_command("tune", help="search hyperparameters of a run config (Optuna's TPE, ASHA early "
                                       "stopping, trials on Ray)"))


COMBINE_HELP = "combine the adapters of several runs into one (task arithmetic, TIES, DARE, cat, svd, ...)"


def _combine_arguments(combine: argparse.ArgumentParser) -> None:
    combine.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of one base model")
    combine.add_argument("--method", required=True, help="task_arithmetic, ties, dare_linear, dare_ties, "
                         "magnitude_prune, cat, svd, linear, or a *_svd variant (see peftlab.combine)")
    combine.add_argument("--weights", required=True, help="one weight per run, comma-separated, e.g. 0.6,0.4")
    combine.add_argument("--density", type=float, help="share of each change kept (ties, dare_*, magnitude_prune)")
    combine.add_argument("--rank", type=int, help="rank of an svd result (default: the largest input rank)")
    combine.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops")
    combine.add_argument("--format", default="peftlab", choices=("peftlab", "peft"))
    combine.add_argument("--out", required=True, help="the adapter directory to write")
    combine.set_defaults(out_option="--out")


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
    if run.output and pathlib.Path(run.output).exists() and not pathlib.Path(run.output).is_dir():
        raise PeftlabError(f"--output {run.output} is a file, not a folder: choose a new folder for the run "
                           "(or the folder of a run to --resume)")
    _quiet_libraries()
    args.where = lambda: run.output  # read on failure: the trainer fills in the default output
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


def cmd_optimizers(args: argparse.Namespace) -> int:
    from .optim import optimizers

    listed = optimizers()
    width = max(len(name) for name in listed)
    print(f"{'optimizer'.ljust(width)}  what it is")
    for name, about in listed.items():
        print(f"{name.ljust(width)}  {about}")
    return 0


def cmd_losses(args: argparse.Namespace) -> int:
    import dataclasses

    from .losses import loss_class, losses

    width = max(len(name) for name in losses())
    print(f"{'loss'.ljust(width)}  what it is  [formula]  (fields at their defaults)")
    for name in losses():
        cls = loss_class(name)
        about = sys.modules[cls.__module__].__doc__.strip().split(" (")[0]  # the name, before the paper
        fields = ", ".join(f"{f.name}={f.default:g}" if isinstance(f.default, float) else f"{f.name}={f.default}"
                           for f in dataclasses.fields(cls)) or "no fields"
        print(f"{name.ljust(width)}  {about}  [{cls.formula}]  ({fields})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    args.where = lambda: args.run
    _quiet_libraries()
    from .recipe import runs

    runs.evaluate(args.run, data_source=args.data, split=args.split)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    args.where = lambda: args.out
    _quiet_libraries()
    from .recipe import runs

    runs.merge_run(args.run, args.out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    args.where = lambda: args.out
    _quiet_libraries()
    from .recipe import runs

    runs.export_run(args.run, args.out, args.format)
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    args.where = lambda: args.out
    _quiet_libraries()
    from .recipe import runs

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise PeftlabError(f"--weights {args.weights!r} must be numbers separated by commas, e.g. 0.6,0.4") from None
    runs.combine_runs(args.runs, args.out, args.method, weights, density=args.density, rank=args.rank,
                      seed=args.seed, format=args.format)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    args.where = lambda: args.output or args.target
    _quiet_libraries()
    from .bench.analyze import run_from_args

    return run_from_args(args)


def cmd_bench(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from .bench import run_from_args

    return run_from_args(args)


def cmd_tune(args: argparse.Namespace) -> int:
    args.where = lambda: args.out
    _quiet_libraries()
    from .bench.tune import run_from_args

    return run_from_args(args)


COMMANDS = {"bench": cmd_bench, "tune": cmd_tune, "train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "export": cmd_export, "methods": cmd_methods,
            "optimizers": cmd_optimizers, "losses": cmd_losses, "combine": cmd_combine,
            "analyze": cmd_analyze}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    debug = args.debug or os.environ.get("PEFTLAB_DEBUG", "") not in ("", "0")

    def report(err: BaseException) -> int:
        if debug:
            traceback.print_exception(err)
        line, status = failure(err, args.where(), args.out_option)
        print(f"error: {line}", file=sys.stderr)
        return status

    # A helper thread that fails (TensorBoard's writer on a full disk) would print its own traceback.
    # While the command runs its failure is kept: the command itself usually fails the same way
    # a moment later and says so once; one that ends later is reported as it happens.
    background: list[BaseException] = []
    threading.excepthook = lambda hook: _unless_exit(hook, background.append)
    try:
        status = COMMANDS[args.command](args)
    except KeyboardInterrupt as err:  # the trainer's note says what the run left; without one, nothing ran yet
        left = "; ".join(getattr(err, "__notes__", ())) or "nothing was changed"
        print(f"interrupted: {left}", file=sys.stderr)
        return 130
    except Exception as err:  # every failure, bugs included, ends in one line (errors.failure decides it)
        return report(err)
    finally:
        threading.excepthook = lambda hook: _unless_exit(hook, report)
    return report(background[0]) if background else status


def _unless_exit(hook: threading.ExceptHookArgs, handle) -> None:
    """Pass a helper thread's exception to `handle`; a thread ending with SystemExit failed at nothing."""
    if hook.exc_value is not None and not isinstance(hook.exc_value, SystemExit):
        handle(hook.exc_value)


if __name__ == "__main__":
    sys.exit(main())
