"""Searches made of training runs: one recipe run per probe, and the two searches the analyses need.

    run_probe(overrides, run_dir, hooks)      a recipe run (or the summary of one finished before)
    largest_true(predicate, start, limit)     the largest n with predicate(n), predicate monotone
                                              decreasing: doubling, then bisection
    smallest_true(predicate, candidates)      the first candidate with predicate, predicate monotone
                                              increasing over the sorted candidates: bisection

A probe whose run directory already holds summary.json is not trained again, so a search that
was stopped continues where it was.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

from ..errors import PeftlabError
from ..recipe import config, trainer


def run_probe(overrides: list[str], run_dir: pathlib.Path, hooks: trainer.Hooks, echo=print) -> dict[str, Any]:
    """The summary of the recipe run `overrides` describe, trained in `run_dir` unless finished there."""
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    run = config.build(None, [*overrides, f"output={run_dir}"])
    return trainer.train(run, overwrite=run_dir.exists(), echo=lambda *a: None, hooks=hooks)


def largest_true(predicate: Callable[[int], bool], start: int, limit: int,
                 resolution: float = 0.0) -> tuple[int, dict[int, bool]]:
    """(largest n in [start, limit] found with predicate(n), {n: predicate(n)} for every n tried); 0 when
    predicate(start) is false. Stops bisecting when the bracket is within `resolution` x n (0: exact)."""
    if not 1 <= start <= limit:
        raise PeftlabError(f"the search range must satisfy 1 <= start <= limit, got start={start}, limit={limit}")
    tried: dict[int, bool] = {}

    def test(n: int) -> bool:
        tried[n] = predicate(n)
        return tried[n]

    if not test(start):
        return 0, tried
    good, bad = start, None
    while bad is None and good < limit:  # doubling until one fails (or the limit fits)
        n = min(2 * good, limit)
        good, bad = (n, None) if test(n) else (good, n)
    while bad is not None and bad - good > max(1, int(resolution * good)):
        middle = (good + bad) // 2
        good, bad = (middle, bad) if test(middle) else (good, middle)
    return good, tried


def smallest_true(predicate: Callable[[int], bool], candidates: list[int]) -> tuple[int | None, dict[int, bool]]:
    """(smallest candidate with predicate, {candidate: predicate} tried); None when even the largest fails."""
    ordered = sorted(set(candidates))
    if not ordered:
        raise PeftlabError("the search needs at least one candidate value")
    tried: dict[int, bool] = {}

    def test(index: int) -> bool:
        tried[ordered[index]] = predicate(ordered[index])
        return tried[ordered[index]]

    if not test(len(ordered) - 1):
        return None, tried
    low, high = -1, len(ordered) - 1  # predicate false at low (or below the list), true at high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if test(middle) else (middle, high)
    return ordered[high], tried
