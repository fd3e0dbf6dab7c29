"""torch.compile on attached models: one graph, the same losses, no stale graph after a switch.

Backends, from the cheapest: "eager" (dynamo's capture, run by the eager kernels) for the loop over
every method of the standard suite and for the switches: that is where an adapter could go wrong
(a graph break in its forward, a guard that misses the active set, a regulariser stored as a side
effect of the forward); "aot_eager" (the backward traced too, through AOTAutograd) with
fullgraph=True for LoRA, DoRA and prefix tuning. Neither compiles C++, and both run the same
kernels as eager mode, so losses, gradients and trained values agree to rounding: the stated
tolerance is 1e-5 relative (observed: exactly equal). Inductor's C++ kernels are timed by
bench/overhead.py --compile rather than tested here (a cold C++ compile takes a minute on 2 cores).
"""
from __future__ import annotations

import dataclasses
import pathlib

import pytest
import torch
from torch._dynamo.utils import counters

import peftlab
from conftest import tiny_bert, token_batch
from peftlab.bench import suite as suites
from peftlab.methods.lora import LoRAAdapter

STEPS = 3
LR = 1e-2
RTOL = 1e-5  # compiled vs eager losses, relative
QV = ["query", "value"]

STANDARD = suites.load("standard")
SUITE_METHODS = [m for m in STANDARD.method_names(peftlab.methods()) if m in peftlab.methods()]  # no baselines


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no graph, recompile or graph-break count carried over from another."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_classifier(seed: int = 0):
    """tiny_bert's shapes, one layer (less to trace), with a 3-way head; problem_type set, so the loss adds no
    recompile."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3,
                     problem_type="single_label_classification")
    return BertForSequenceClassification(cfg)


def labelled_batch(seed: int) -> dict:
    batch = token_batch(seed=seed, batch=4, length=8)
    return {**batch, "labels": torch.tensor([0, 1, 2, 1])}


def suite_config(method: str) -> peftlab.MethodConfig:
    """The method as the standard suite runs it (its shared fields and overrides), for a STEPS-step run."""
    accepted = {f.name for f in dataclasses.fields(peftlab.method_class(method))}
    job = suites.Job(method, next(iter(STANDARD.tasks)), 0, "final")
    fields = suites.run_config(STANDARD, job, LR, pathlib.Path("unused"), accepted)["method"]
    fields = {k: v for k, v in fields.items() if k != "name"}
    if "total_steps" in fields:
        fields["total_steps"] = STEPS
    if method == "increlora":  # grow ranks within the run, so growth happens under the compiled forward
        fields.update(warmup=1, interval=1, target_rank=2, top_h=1)
    if method == "lisa":  # its default of 2 active blocks, in a 1-block model
        fields.update(active_blocks=1)
    return peftlab.config(method, **fields, also_train=["classifier"])


def train(method: str, compile_with: dict | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """STEPS AdamW steps of a tiny classifier with `method` attached, as the recipe takes them (loss +
    regulariser, step hook before zero_grad); compile_with: torch.compile's arguments, None for eager.
    Returns the losses (STEPS,) and the trained values of the adapter's parameters."""
    model = tiny_classifier()
    needs_data = peftlab.method_class(method).needs_calibration
    calibration = [labelled_batch(100 + i) for i in range(2)] if needs_data else None
    peftlab.attach(model, suite_config(method), calibration=calibration)
    model.train()
    forward = torch.compile(model, **compile_with) if compile_with is not None else model
    optimizer = torch.optim.AdamW(peftlab.param_groups(model, LR))
    torch.manual_seed(1)  # dropout draws the same masks in both runs
    losses = []
    for step in range(1, STEPS + 1):
        loss = forward(**labelled_batch(step)).loss
        regularizer = peftlab.regularization(model)
        total = loss if regularizer is None else loss + regularizer
        total.backward()
        optimizer.step()
        peftlab.step(model, step, optimizer)
        optimizer.zero_grad()
        losses.append(total.item())
    return torch.tensor(losses), {k: p.detach().clone() for k, p in peftlab.trainable_parameters(model).items()}


# ---- every method of the standard suite trains the same compiled -----------------------------------

@pytest.mark.parametrize("method", SUITE_METHODS)
def test_compiled_training_gives_the_eager_losses(method):
    """torch.compile(model) as a user calls it (fullgraph off): no graph break unless the method declares
    compile_fullgraph = False, and then there is one (the declaration is not stale). Counted rather than
    refused by fullgraph=True, which in this torch traces some breaks away (bincount's data-dependent
    shape) that a plain compile still breaks on."""
    eager_losses, eager_trained = train(method, None)
    compiled_losses, compiled_trained = train(method, {"backend": "eager"})
    breaks = dict(counters["graph_break"])
    assert bool(breaks) != peftlab.method_class(method).compile_fullgraph, breaks
    assert len(set(eager_losses.tolist())) > 1, "the losses must move, or the comparison proves nothing"
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=RTOL, atol=0)
    assert compiled_trained.keys() == eager_trained.keys()
    for name, value in eager_trained.items():  # the adapter's own values: far more sensitive than a loss
        torch.testing.assert_close(compiled_trained[name], value, rtol=RTOL, atol=1e-7, msg=name)


def test_only_increlora_declares_a_graph_break():
    """A new declaration must be argued for in the method's file and docs/architecture.md."""
    assert [m for m in peftlab.methods() if not peftlab.method_class(m).compile_fullgraph] == ["increlora"]


# ---- one graph, forward and backward ----------------------------------------------------------------

FULLGRAPH_CASES = {
    "lora": lambda: peftlab.LoRA(r=4, targets=QV),
    "dora": lambda: peftlab.DoRA(r=4, targets=QV),
    "prefix": lambda: peftlab.config("prefix", targets=None),  # a model-level adapter: hooks on the model
}


def perturbed(model):
    """Move every trainable parameter off its start, so that adapters (B = 0 at init) change the output."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def outputs_and_grads(forward, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (tiny_bert's 0.1) in eager and compiled runs
    out = forward(**batch).last_hidden_state
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in peftlab.trainable_parameters(model).items()}


@pytest.mark.parametrize("method", list(FULLGRAPH_CASES))
def test_attach_adds_no_graph_break(method):
    """fullgraph=True raises on any break; aot_eager traces the backward too, whose gradients must agree."""
    model = perturbed(peftlab.attach(tiny_bert(), FULLGRAPH_CASES[method]()))
    model.train()
    batch = token_batch()
    eager_out, eager_grads = outputs_and_grads(model, model, batch)
    compiled_out, compiled_grads = outputs_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"),
                                                     model, batch)
    torch.testing.assert_close(compiled_out, eager_out, rtol=RTOL, atol=1e-6)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=RTOL, atol=1e-7, msg=name)


def test_a_python_read_in_an_adapter_forward_is_caught(monkeypatch):
    """The check above can fail: a `.item()` inside LoRA's forward makes fullgraph compiling refuse it."""
    forward = LoRAAdapter.forward

    def reads_a_number(self, host, x, base):
        if x.abs().sum().item() < 0:  # data-dependent Python branching: a graph break
            return base(x)
        return forward(self, host, x, base)

    monkeypatch.setattr(LoRAAdapter, "forward", reads_a_number)
    model = peftlab.attach(tiny_bert(), peftlab.LoRA(r=4, targets=QV))
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        torch.compile(model, fullgraph=True, backend="eager")(**token_batch())


# ---- switching after compiling: the guards see it ---------------------------------------------------

@torch._dynamo.config.patch(recompile_limit=16)  # 8 configurations here: torch's default limit
def test_switching_after_compiling_gives_the_eager_outputs():
    """Each adapter configuration (active set, disabled, merged, a mixed batch) is a graph of its own that
    dynamo's guards pick; none may serve a configuration it was not traced for."""
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=4, targets=QV), "a")
    peftlab.attach(model, peftlab.DoRA(r=4, targets=QV, also_train=["pooler"]), "b")
    peftlab.attach(model, peftlab.config("prefix", targets=None), "p")
    perturbed(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    batch = token_batch()

    def agree(what: str) -> torch.Tensor:
        with torch.no_grad():
            expected, got = model(**batch).pooler_output, compiled(**batch).pooler_output
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=1e-6, msg=what)
        return got

    every = agree("a, b and p")
    peftlab.set_active(model, "a")
    only_a = agree("a alone")
    peftlab.set_active(model, ["b", "p"])
    agree("b and p")
    with peftlab.disabled(model):  # also swaps the pooler's original values back in
        base = agree("disabled")
    peftlab.set_active(model, ["a", "b"])
    peftlab.detach(model, "p")  # per_example routes through host layers only
    with peftlab.per_example(model, ["a", None, "b"]):
        agree("a mixed batch")
    peftlab.merge(model, "a")
    agree("a merged")
    peftlab.unmerge(model)
    peftlab.set_active(model, "a")
    torch.testing.assert_close(agree("a alone again"), only_a)  # the first graph for it, still right
    assert not torch.allclose(every, base) and not torch.allclose(only_a, base)  # the switches changed outputs


def test_peftlab_takes_the_compiled_model_not_its_wrapper():
    model = peftlab.attach(tiny_bert(), peftlab.LoRA(r=4, targets=QV), "a")
    peftlab.attach(model, peftlab.LoRA(r=2, targets=QV), "b")
    wrapper = torch.compile(model, backend="eager")
    with pytest.raises(peftlab.PeftlabError, match=r"torch.compile\(model\).*_orig_mod.*model.compile\(\)"):
        peftlab.set_active(wrapper, "b")
    assert peftlab.adapter_configs(model).keys() == {"a", "b"} and model.__dict__["_peftlab"].active == ["a", "b"]

    perturbed(model).compile(backend="eager", fullgraph=True)  # in place: the same object, peftlab works on it
    with torch.no_grad():
        both = model(**token_batch()).last_hidden_state
        peftlab.set_active(model, "b")
        only_b = model(**token_batch()).last_hidden_state
        with peftlab.disabled(model):
            base = model(**token_batch()).last_hidden_state
    reference = tiny_bert()
    with torch.no_grad():
        torch.testing.assert_close(base, reference(**token_batch()).last_hidden_state, rtol=RTOL, atol=1e-6)
    assert not torch.allclose(both, only_b) and not torch.allclose(only_b, base)
