"""Task metrics: accuracy and macro F1 from predicted labels, and `score`, a trained model's
loss and metrics on rows of a task (what `peftlab eval` prints).

The Trainer reports the same numbers during a run through `classification_metrics`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from . import data


def label_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 (the mean over the classes present of each class's F1)."""
    f1s = []
    for c in np.unique(labels):
        tp = np.sum((predicted == c) & (labels == c))
        denominator = np.sum(predicted == c) + np.sum(labels == c)
        f1s.append(2 * tp / denominator if denominator else 0.0)
    return {"accuracy": float((predicted == labels).mean()), "macro_f1": float(np.mean(f1s))}


def classification_metrics(prediction) -> dict[str, float]:
    """The Trainer's compute_metrics: from logits (examples, classes) and labels (examples,)."""
    return label_metrics(np.asarray(prediction.predictions).argmax(-1), np.asarray(prediction.label_ids))


@torch.no_grad()
def score(model: nn.Module, tokenizer, rows: list[dict], kind: str, max_length: int, batch_size: int,
          progress: bool = True) -> dict[str, float]:
    """Loss (per example, or per answer token for SFT) and, for classification, accuracy and macro F1."""
    from tqdm.auto import tqdm

    encoded = data.encode(rows, kind, tokenizer, max_length)
    collate = data.PadCollator(tokenizer.pad_token_id)
    loss_sum, count, predicted, labels = 0.0, 0, [], []
    for start in tqdm(range(0, len(encoded), batch_size), desc="eval", disable=not progress):
        batch = collate(encoded[start:start + batch_size])
        target = batch.pop("labels")
        logits = model(**batch).logits.float()  # (batch, classes) or (batch, tokens, vocabulary)
        if kind == "sft":  # token t predicts token t+1
            logits, target = logits[:, :-1], target[:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=data.IGNORE_INDEX, reduction="sum")
        loss_sum += loss.item()
        count += int((target != data.IGNORE_INDEX).sum())
        if kind == "classification":
            predicted.append(logits.argmax(-1).numpy())
            labels.append(target.numpy())
    result = {"loss": loss_sum / count, "examples": len(encoded)}
    if kind == "classification":
        result.update(label_metrics(np.concatenate(predicted), np.concatenate(labels)))
    else:
        result["perplexity"] = math.exp(min(result["loss"], 50))
    return result
