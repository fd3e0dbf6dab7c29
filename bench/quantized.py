"""LoRA on a quantized base (QLoRA) against a full-precision one: SmolLM2-135M on chatterbot, CPU.

Three runs of the training recipe, each in its own spawned process so one's peak does not hide
another's: the base in fp32, in int8 and in NF4 (peftlab.quantize, bitsandbytes), LoRA r = 8 on
every linear layer but the (tied) head, the same seed, data and `--steps` optimizer steps, with
gradient checkpointing and micro-batches of 2 accumulated to 8 examples a step (as QLoRA trains:
the activations and the (2, 128, 49152) logits stay small; --no-gradient-checkpointing and
--micro-batch 8 undo it). Measured, neither moved the peaks much (docs/findings.md).

  peak_rss_mb           getrusage's maximum RSS of the whole run, loading included. A quantized base
                        loads layer by layer (recipe/models.py): never in fp32, at most one fp32
                        weight of a quantized layer at a time. The fp32 base is memory-mapped by
                        transformers, its pages resident once read (the first forward)
  training_peak_rss_mb  the maximum RSS from the end of loading (VmHWM reset through
                        /proc/self/clear_refs, after a malloc_trim) to the end of the run: what
                        training on the base holds
  s_per_step            training time / steps (the recipe's own timing)
  answer_loss           the held-out (test split) loss on the answer tokens after training
  runtime_rss_mb        the RSS of the process before the model loads (python, torch, transformers, and
                        bitsandbytes for a quantized base; the committed record predates that):
                        a floor no quantization lowers; rss_above_runtime_ratio compares what is above it
  rss_ratio, loss_gap   against fp32 (goal, issue 21: NF4 peak RSS <= 0.5 of fp32 at an answer loss
                        within 0.05)

Results: bench/results/quantized.json and quantized.png.
Usage: python bench/quantized.py [--steps 200] [--schemes fp32,int8,nf4] [--output bench/results]
       smoke: python bench/quantized.py --steps 3 --limit 48 --output /tmp/quantized
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import resource
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMES = ("fp32", "int8", "nf4")
GOAL_RSS_RATIO, GOAL_LOSS_GAP = 0.5, 0.05
BATCH = 8  # examples per optimizer step


def run_config(scheme: str, steps: int, output: Path, limit: int | None = None, checkpointing: bool = True,
               micro_batch: int = BATCH) -> list[str]:
    """--set overrides of one run: the same everything but the base's quantization (limit: examples, for a
    smoke). Each step takes BATCH examples, in BATCH // micro_batch forward/backward passes."""
    model = "smollm2-135m" if scheme == "fp32" else f"{{name: smollm2-135m, quantize: {scheme}}}"
    return [f"model={model}", "task=chatterbot", "method={name: lora, r: 8, alpha: 16, targets: all-linear}",
            "optimizer.lr=2e-4", "data.max_length=128", f"train.batch_size={micro_batch}", f"train.grad_accum={BATCH // micro_batch}",
            # eval batches of 8 too: at the default 64, eval's (64, 128, 49152) fp32 logits (1.6 GB) set the peak
            "train.eval_batch_size=8", f"train.steps={steps}",
            f"train.save_every={max(steps, 1)}", f"train.log_every={max(steps // 10, 1)}", "train.progress=false",
            f"train.gradient_checkpointing={str(checkpointing).lower()}", "seed=0", f"output={output}"] + ([f"data.limit={limit}"] if limit else [])


def _reset_peak_rss() -> None:
    """Give freed memory back (glibc) and restart the kernel's peak-RSS count (VmHWM) from now."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(scheme: str, steps: int, limit: int | None, options: dict, results) -> None:
    """One run, in this (spawned) process (options: run_config's memory settings); its figures go to `results`."""
    import gc

    from peftlab.recipe import config as runconfig, models, trainer

    if scheme != "fp32":
        import bitsandbytes  # noqa: F401  (its import, about 120 MB, belongs to a quantized run's floor)
    runtime_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # python, torch, transformers: no model yet

    load = models.load

    def load_then_reset(*args, **kwargs):  # the training peak starts once the (quantized) model is loaded
        loaded = load(*args, **kwargs)
        gc.collect()
        _reset_peak_rss()
        return loaded

    models.load = load_then_reset  # the trainer calls models.load(...) through the module
    with tempfile.TemporaryDirectory() as scratch:
        summary = trainer.train(runconfig.build(None, run_config(scheme, steps, Path(scratch) / "run", limit, **options)),
                                echo=lambda *a: None)
    test = summary["metrics"].get("test", {})
    results[scheme] = {
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "runtime_rss_mb": round(runtime_rss),
        "training_peak_rss_mb": round(_vm_hwm_mb()),
        "s_per_step": summary["train_time_s"] / summary["steps"],
        "answer_loss": test.get("loss", test.get("eval_loss")),
        "trainable_parameters": summary["trainable_parameters"],
    }


def compare(results: dict) -> dict:
    """Each scheme against fp32: RSS ratios and the answer-loss gap, and whether NF4 meets the goal."""
    base = results.get("fp32")
    out = {}
    for scheme, row in results.items():
        if base is None or scheme == "fp32":
            continue
        out[scheme] = {"rss_ratio": row["peak_rss_mb"] / base["peak_rss_mb"],
                       # what the run adds to the interpreter and libraries, which no scheme can shrink
                       "rss_above_runtime_ratio": (row["peak_rss_mb"] - row["runtime_rss_mb"])
                       / (base["peak_rss_mb"] - base["runtime_rss_mb"]),
                       "training_rss_ratio": row["training_peak_rss_mb"] / base["training_peak_rss_mb"],
                       "loss_gap": None if row["answer_loss"] is None or base["answer_loss"] is None
                       else row["answer_loss"] - base["answer_loss"]}
    if "nf4" in out and out["nf4"]["loss_gap"] is not None:
        out["nf4"]["goal_met"] = out["nf4"]["rss_ratio"] <= GOAL_RSS_RATIO and out["nf4"]["loss_gap"] <= GOAL_LOSS_GAP
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = [s for s in SCHEMES if s in results]
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    panels = [("peak RSS (MiB)", ["peak_rss_mb", "training_peak_rss_mb"]), ("s / step", ["s_per_step"]),
              ("held-out answer loss", ["answer_loss"])]
    for axis, (title, keys) in zip(axes, panels):
        width = 0.8 / len(keys)
        for i, key in enumerate(keys):
            values = [results[s][key] or 0 for s in schemes]
            axis.bar([j + i * width for j in range(len(schemes))], values, width, label=key)
        axis.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(schemes))], schemes)
        axis.set_title(title)
        if len(keys) > 1:
            axis.legend(fontsize=7)
    figure.suptitle("SmolLM2-135M, LoRA r=8 all-linear, chatterbot: fp32 vs quantized base", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute activations in the backward (QLoRA's setting; default on)")
    parser.add_argument("--micro-batch", type=int, default=2, choices=(1, 2, 4, 8),
                        help=f"examples per forward/backward pass (default 2: {BATCH} // 2 accumulated passes a step); "
                             "the (micro_batch, 128, 49152) logits and their gradients are the largest tensors")
    parser.add_argument("--limit", type=int, help="use this many examples only (a smoke run; not for the record)")
    args = parser.parse_args()
    schemes = args.schemes.split(",")
    unknown = sorted(set(schemes) - set(SCHEMES))
    if unknown:
        parser.error(f"unknown scheme(s) {unknown}: use {', '.join(SCHEMES)}")
    options = {"checkpointing": args.gradient_checkpointing, "micro_batch": args.micro_batch}
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        for scheme in schemes:
            process = context.Process(target=measure, args=(scheme, args.steps, args.limit, options, results))
            process.start()
            process.join()
            if process.exitcode != 0:
                raise SystemExit(f"the {scheme} run failed (exit {process.exitcode})")
            print(scheme, dict(results[scheme]), flush=True)
        results = {s: dict(results[s]) for s in schemes}
    record = {"model": "smollm2-135m", "task": "chatterbot", "method": "lora r=8 all-linear", "steps": args.steps,
              "limit": args.limit, "batch": BATCH, **options,
              "results": results, "against_fp32": compare(results),
              "goal": {"nf4_rss_ratio_at_most": GOAL_RSS_RATIO, "nf4_loss_gap_at_most": GOAL_LOSS_GAP},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    args.output.mkdir(parents=True, exist_ok=True)
    from peftlab.io import files

    files.write_json(args.output / "quantized.json", record)
    plot(results, args.output / "quantized.png")
    print(json.dumps(record["against_fp32"], indent=2))


if __name__ == "__main__":
    main()
