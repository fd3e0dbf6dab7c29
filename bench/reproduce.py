"""Re-run committed bench records and check that their metrics come back exactly.

A refactor that changes no behaviour must leave every run's numbers as they were. This trains a
sample of a suite's final runs again, into a scratch results folder, and compares each new
record's metrics with the committed one: equal to the last bit, or the script says which metric
moved and by how much and exits 1.

The default sample is one method of each family plus the two baselines and one `peft` peer, on
the `quick` suite (80 steps each: about 5 minutes on 2 cores with 2 workers). Selection records
(`--select`) are not re-run: the learning rates are those the committed records chose.

Usage:
    python bench/reproduce.py                                # the default sample, quick suite
    python bench/reproduce.py --suite standard --only lora--movie-sentiment--s0
    python bench/reproduce.py --methods dora,vera --keep /tmp/repro
    python bench/reproduce.py --out bench/results/reproduce-quick.json
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import subprocess
import sys
import tempfile

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# One method per family of the README's method table, the two baselines, and LoRA's peer.
FAMILIES = {
    "LoRA and its initialisations": "eva",
    "weight-decomposed / re-weighted": "dora",
    "shared random bases": "vera",
    "spectral and factorised": "svfit",
    "rank that changes while training": "adalora",
    "sparse + low-rank": "dsee",
    "plain LoRA (and its peft peer)": "lora",
    "baseline: linear probe": "head-only",
    "baseline: full fine-tuning": "full",
}


def final_records(folder: pathlib.Path) -> dict[str, dict]:
    """Run name -> record, for the final (not selection) records in a results folder."""
    records = {}
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        if record.get("phase") == "final" and record.get("status") == "ok":
            records[path.stem] = record
    return records


def seed_selections(committed: pathlib.Path, scratch: pathlib.Path) -> None:
    """Copy the committed selection records, so the bench re-uses their choices instead of re-selecting."""
    for path in committed.glob("*--select.json"):
        shutil.copy2(path, scratch / path.name)


def run_bench(suite: str, scratch: pathlib.Path, methods: list[str], only: list[str], seeds: str | None) -> None:
    command = [sys.executable, "-m", "peftlab.bench", suite, "--results", str(scratch),
               "--runs", str(scratch / "runs"), "--no-report"]
    if methods:
        command += ["--methods", ",".join(methods)]
    for prefix in only:
        command += ["--only", prefix]
    if seeds:
        command += ["--seeds", seeds]
    subprocess.run(command, check=True)


def metric_differences(old: dict, new: dict) -> list[str]:
    """'split.metric old -> new' for every metric that is not bit-for-bit the same."""
    moved = []
    for split, values in old.get("metrics", {}).items():
        for metric, value in values.items():
            again = new.get("metrics", {}).get(split, {}).get(metric)
            same = again == value or (isinstance(value, float) and math.isnan(value) and math.isnan(again))
            if not same:
                moved.append(f"{split}.{metric} {value!r} -> {again!r}")
    return moved


def compare(committed: dict[str, dict], again: dict[str, dict]) -> dict[str, dict]:
    """Run name -> {"same", "moved", "test_accuracy"}, printed one line per re-run record."""
    outcome = {}
    for name, record in sorted(again.items()):
        moved = (metric_differences(committed[name], record) if name in committed
                 else ["no committed record to compare with"])
        accuracy = record["metrics"].get("test", {}).get("accuracy")
        print(f"  {name:45s} {'same' if not moved else 'MOVED'}  test accuracy {accuracy}")
        for line in moved:
            print(f"      {line}")
        outcome[name] = {"same": not moved, "moved": moved, "test_accuracy": accuracy}
    return outcome


def write_outcome(path: pathlib.Path, suite: str, outcome: dict[str, dict], argv: list[str]) -> None:
    """The comparison as JSON, with the command and the source commit that made it."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=RESULTS.parent).stdout.strip() or None
    document = {"suite": suite, "command": " ".join(["python bench/reproduce.py", *argv]),
                "peftlab_commit": commit, "runs": outcome}
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="quick")
    parser.add_argument("--methods", default=None, help="comma-separated (default: one per family)")
    parser.add_argument("--only", action="append", default=[], help="run-name prefix (repeatable)")
    parser.add_argument("--seeds", default=None, help="final runs of these seeds only (e.g. 0)")
    parser.add_argument("--keep", type=pathlib.Path, default=None, help="scratch folder to keep (default: temporary)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the comparison as JSON here")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    committed_dir = RESULTS / args.suite
    methods = args.methods.split(",") if args.methods else ([] if args.only else list(FAMILIES.values()))
    scratch = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="peftlab-reproduce-"))
    scratch.mkdir(parents=True, exist_ok=True)
    seed_selections(committed_dir, scratch)
    run_bench(args.suite, scratch, methods, args.only, args.seeds)
    again = final_records(scratch)
    print(f"{len(again)} runs re-trained from {committed_dir} ({args.suite}):")
    outcome = compare(final_records(committed_dir), again)
    failures = sum(not row["same"] for row in outcome.values())
    if args.out:
        write_outcome(args.out, args.suite, outcome, argv)
    if args.keep is None:
        shutil.rmtree(scratch, ignore_errors=True)
    print("all metrics equal to the committed records" if not failures else f"{failures} run(s) moved")
    return 1 if failures or not again else 0


if __name__ == "__main__":
    sys.exit(main())
