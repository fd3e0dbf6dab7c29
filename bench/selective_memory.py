"""Memory of sparse and selective fine-tuning on SmolLM2-135M (CPU, fp32): full fine-tuning, LoRA, LISA,
HFT, S2FT and SpIEL at a LoRA-like budget.

For each method, in its own spawned process (so one's peak does not hide another's):

  trainable       parameters that train at once (LISA: its active blocks + the outside)
  optimizer_mb    the largest AdamW state (exp_avg + exp_avg_sq, step counts aside) seen right after any
                  optimizer step: what the optimizer holds at its fullest
  peak_rss_mb     getrusage's maximum RSS after `--steps` steps of a causal-LM loss on batches of
                  4 x 128 tokens, the step hook called with the optimizer after each

LISA (2 active blocks) and HFT re-draw every 2 steps here, so the run crosses a re-draw: a block
or layer that freezes gives back its optimizer state, and the figures show the state of the
trained share only. SpIEL's budget per layer is that of a rank-8 LoRA (8 x (in + out)); LoRA is
r = 8 on every linear layer; S2FT trains 10% of the heads of v/o (64-row units) and 10% of the
channels of up/gate/down. Results: bench/results/selective_memory.json.
Usage: python bench/selective_memory.py [--methods full,lora,lisa,hft,s2ft,spiel] [--steps 4]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH, SEQ = 4, 128
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "lora": {"name": "lora", "r": 8, "targets": ALL_LINEAR},
    "lisa": {"name": "lisa", "active_blocks": 2, "interval": 2},
    "hft": {"name": "hft", "stage_steps": 2},
    "s2ft": {"name": "s2ft", "fraction": 0.1, "targets": ["v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "overrides": {"re:.*(v_proj|o_proj)$": {"unit": 64}}},
    "spiel": {"name": "spiel", "lora_rank": 8, "targets": ALL_LINEAR},
}


def adapted(method: str):
    import torch

    import peftlab
    from peftlab.recipe import models

    torch.manual_seed(0)
    model, _ = models.load(models.SMOLLM2, "sft")
    if method == "full":
        return model, [p for p in model.parameters()], lambda step, optimizer: None
    fields = dict(CONFIGS[method])
    peftlab.attach(model, peftlab.config(fields.pop("name"), **fields))
    return (model, peftlab.param_groups(model, 1e-4),
            lambda step, optimizer: peftlab.step(model, step, optimizer=optimizer))


def state_bytes(optimizer) -> int:
    import torch

    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor) and t.dim() > 0)  # the moments; not Adam's step counts


def measure(method: str, steps: int, results) -> None:
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    model, groups, after_step = adapted(method)
    model.train()
    optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    largest_state, trainable = 0, 0
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        largest_state = max(largest_state, state_bytes(optimizer))
        trainable = max(trainable, sum(p.numel() for p in model.parameters() if p.requires_grad))
        after_step(step, optimizer)
    results.put({"method": method, "trainable": trainable, "total": sum(p.numel() for p in model.parameters()),
                 "optimizer_mb": round(largest_state / 2**20, 1),
                 "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="full,lora,lisa,hft,s2ft,spiel")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "selective_memory.json"))
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    rows = []
    print("| method | trainable | share | optimizer state (MB) | peak RSS (MB) |\n|---|---|---|---|---|")
    for method in args.methods.split(","):
        queue = context.Queue()
        process = context.Process(target=measure, args=(method, args.steps, queue))
        process.start()
        row = queue.get()
        process.join()
        rows.append(row)
        print(f"| {method} | {row['trainable']:,} | {100 * row['trainable'] / row['total']:.1f}% | "
              f"{row['optimizer_mb']} | {row['peak_rss_mb']} |", flush=True)
    import torch

    setup = {"model": "SmolLM2-135M-Instruct, fp32", "batch": [BATCH, SEQ], "steps": args.steps,
             "optimizer": "AdamW", "configs": CONFIGS, "torch": torch.__version__,
             "machine": platform.platform(), "cpus": os.cpu_count()}
    from peftlab.io import files

    files.write_json(Path(args.out), {"setup": setup, "rows": rows})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
