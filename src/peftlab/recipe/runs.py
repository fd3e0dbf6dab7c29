"""What the command line does with a finished run directory: evaluate, merge, export.

    evaluate(run_dir, data_source=None, split="test")   metrics of the trained model
    merge_run(run_dir, out)                              a plain transformers checkpoint
    export_run(run_dir, out, format="peft")              the adapter in `peft`'s format
    combine_runs(run_dirs, out, method, weights)         one adapter combining several runs' adapters

Each starts from `load_trained`: the run's base model (by the name in its config.yaml) with
the trained adapter and head from `adapter/` put back.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from . import adaptation, data, models
from .metrics import score
from .rundir import read_run
from ..combine import combine
from ..core import adapter_configs, attach, detach
from ..errors import PeftlabError
from ..io import files, load, save


def load_trained(run_dir: str | pathlib.Path):
    """(model, tokenizer, run config, task record) of a finished run, in eval mode."""
    run_dir = pathlib.Path(run_dir)
    run, task = read_run(run_dir)
    adapter_dir = run_dir / "adapter"
    if not adapter_dir.is_dir():
        raise PeftlabError(f"{run_dir} has no adapter/ (the run did not finish): continue it with "
                           f"`peftlab train --resume {run_dir}`")
    model, tokenizer = models.load(run.model, task["kind"], task["label_names"])
    baseline_file = adapter_dir / adaptation.BASELINE_FILE
    if baseline_file.is_file():  # head-only / full baselines save the parameters they trained
        from safetensors.torch import load_file

        trained = load_file(baseline_file)
        unknown = sorted(set(trained) - set(model.state_dict()))
        if unknown:
            raise PeftlabError(f"{baseline_file} holds tensors this model lacks ({unknown[:3]}): "
                               "the run's model has changed")
        model.load_state_dict(trained, strict=False)
    else:
        load(model, adapter_dir)
    return model.eval(), tokenizer, run, task


# ---- eval -------------------------------------------------------------------------------------


def _rows_to_evaluate(run, task: dict, data_source: str | None, split: str) -> tuple[str, list[dict]]:
    if data_source is None or data_source == run.task:
        source = data.load(run.task, run.data, run.seed)
        name = run.task if run.task != data.FILE_TASK else run.data.path
    elif data_source in data.TASKS:
        source = data.TASKS[data_source].load()
        name = data_source
    else:
        path = pathlib.Path(data_source)
        if not path.is_file():
            raise PeftlabError(f"--data {data_source!r} is neither a task ({', '.join(data.TASKS)}) nor a file")
        source = data.from_file(path, task["kind"], data.file_columns(run.data, task["kind"]))
        split, name = "all", str(path)
    if source.kind != task["kind"]:
        raise PeftlabError(f"--data {name} is a {source.kind} task, the run trained {task['kind']}: "
                           "evaluate on data of the same kind")
    rows = source.rows
    if source.kind == "classification":  # labels by name: another source may order them differently
        unknown = sorted(set(source.label_names) - set(task["label_names"]))
        if unknown:
            raise PeftlabError(f"--data {name} has labels {unknown} the run never saw; its labels are "
                               f"{task['label_names']}")
        index = {n: i for i, n in enumerate(task["label_names"])}
        rows = [{**r, "label": index[source.label_names[r["label"]]]} for r in rows]
    if split != "all":
        parts = dict(zip(("train", "validation", "test"), data.split(rows, tuple(run.data.split), run.seed)))
        rows = parts[split]
    if not rows:
        raise PeftlabError(f"the {split} split of {name} is empty: choose another --split")
    return f"{name} ({split})", rows


def evaluate(run_dir: str | pathlib.Path, data_source: str | None = None, split: str = "test",
             echo=print) -> dict[str, Any]:
    name, rows = _rows_to_evaluate(*read_run(run_dir), data_source, split)  # bad data fails before loading
    model, tokenizer, run, task = load_trained(run_dir)
    result = score(model, tokenizer, rows, task["kind"], run.data.max_length, run.train.eval_batch_size,
                   progress=run.train.progress)
    shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
    echo(f"{name}: {shown}")
    return result


# ---- merge and export -------------------------------------------------------------------------


def _fresh_target(out: str | pathlib.Path) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PeftlabError(f"--out {out} exists and is not empty: choose a new directory (nothing was written)")
    return out


def merge_run(run_dir: str | pathlib.Path, out: str | pathlib.Path, echo=print) -> pathlib.Path:
    out = _fresh_target(out)
    model, tokenizer, run, task = load_trained(run_dir)
    if adapter_configs(model):
        detach(model, keep_merged=True)
    with files.new_directory(out) as scratch:  # a reader never sees half of it; an empty `out` is replaced
        model.save_pretrained(scratch)  # safetensors
        tokenizer.save_pretrained(scratch)
    auto = "AutoModelForSequenceClassification" if task["kind"] == "classification" else "AutoModelForCausalLM"
    echo(f"merged model written to {out} (load it with transformers.{auto}.from_pretrained)")
    return out


def export_run(run_dir: str | pathlib.Path, out: str | pathlib.Path, format: str = "peft",
               echo=print) -> pathlib.Path:
    out = _fresh_target(out)
    model, _, run, task = load_trained(run_dir)
    if not adapter_configs(model):
        raise PeftlabError(f"{run_dir} is a {run.method['name']} baseline run: it has no adapter to export; "
                           "use `peftlab merge` for a full checkpoint")
    with files.new_directory(out) as scratch:
        save(model, scratch, format=format)
    echo(f"{format} adapter written to {out}")
    return out


# ---- combine ------------------------------------------------------------------------------------


def attach_run_adapter(model, run_dir: str | pathlib.Path, name: str) -> None:
    """Attach a finished run's adapter under `name`: its layers' change only, not the task head or
    other modules it trained in full (a combination keeps each task's head apart)."""
    from ..io.native import is_native
    from ..registry import from_json

    adapter_dir = pathlib.Path(run_dir) / "adapter"
    config_file = adapter_dir / files.CONFIG_FILE
    if (adapter_dir / adaptation.BASELINE_FILE).is_file():
        raise PeftlabError(f"{run_dir} is a baseline run (head-only or full fine-tuning): it has no adapter to "
                           "combine; pass runs of an adapter method")
    if not config_file.is_file():
        raise PeftlabError(f"{run_dir} has no adapter/ (the run did not finish): continue it with "
                           f"`peftlab train --resume {run_dir}`")
    document = files.read_json(config_file)
    entry = document.get("adapters", {}).get(adaptation.ADAPTER_NAME) if is_native(document) else None
    if not isinstance(entry, dict):
        raise PeftlabError(f"{config_file} holds no peftlab adapter {adaptation.ADAPTER_NAME!r} (a peer run "
                           "trained through peft?): combine runs trained by peftlab")
    config = dataclasses.replace(from_json(entry["config"]), also_train=[])
    saved_marker, marker = f".adapters.{adaptation.ADAPTER_NAME}.", f".adapters.{name}."
    tensors = files.read_tensors(adapter_dir / files.WEIGHTS_FILE, document.get("tensors_sha256"))
    own = {("." + k).replace(saved_marker, marker, 1)[1:]: v for k, v in tensors.items()
           if saved_marker in "." + k}  # "<site>.adapters.default.A", or "adapters.default.*" at the root
    attach(model, config, name, state_dict=own)


def combine_runs(run_dirs: list[str | pathlib.Path], out: str | pathlib.Path, method: str, weights: list[float],
                 density: float | None = None, rank: int | None = None, seed: int = 0, format: str = "peftlab",
                 echo=print) -> pathlib.Path:
    """Combine the adapters of finished runs of one base model into one adapter directory `out`
    (adapter files, the adapter named "default", + combine.json naming the inputs); see
    peftlab.combine for the methods."""
    if len(weights) != len(run_dirs):
        raise PeftlabError(f"--weights has {len(weights)} value(s) for {len(run_dirs)} run(s): give one weight "
                           "per run, e.g. --weights 0.6,0.4")
    out = _fresh_target(out)
    records = [read_run(r) for r in run_dirs]
    (first, first_task), first_dir = records[0], run_dirs[0]
    for (run, task), run_dir in zip(records[1:], run_dirs[1:]):
        if (run.model, task["kind"]) != (first.model, first_task["kind"]):
            raise PeftlabError(f"{run_dir} adapted {run.model} ({task['kind']}), {first_dir} adapted {first.model} "
                               f"({first_task['kind']}): combine runs of one base model and task kind")
    model, _ = models.load(first.model, first_task["kind"], first_task["label_names"])
    names = [f"run{i}" for i in range(len(run_dirs))]
    for name, run_dir in zip(names, run_dirs):
        attach_run_adapter(model, run_dir, name)
    # "default": the name a single adapter directory holds in both formats (peft's at the top level)
    combine(model, dict(zip(names, weights)), method, "default", density=density, rank=rank, seed=seed)
    record = {"runs": [str(r) for r in run_dirs], "model": first.model, "method": method, "weights": weights,
              "density": density, "rank": rank, "seed": seed, "format": format}
    with files.new_directory(out) as scratch:
        save(model, scratch, format=format, name="default")
        files.write_json(scratch / "combine.json", record)
    echo(f"{method} of {len(run_dirs)} adapter(s) written to {out} (attach it with peftlab.load(model, "
         f"{str(out)!r}) on {first.model}; each task keeps its own head)")
    return out
