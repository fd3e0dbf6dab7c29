"""The stacked path (peftlab.core): one GEMM per nn.Linear site through [W0; A].

StackedLoRA's gradients against float64 finite differences and against the two-pass formula
written out here; a tiny BERT with LoRA (and DoRA) on every linear computing the same outputs,
gradients and AdamW losses fused and unfused; the view relation after optimizer steps; every
case that must take the chain instead (and still gives the unfused result); detach leaving
plain weights.

Tolerances: float64, 1e-10 (gradcheck: its defaults, eps 1e-6, atol 1e-5); float32 outputs 1e-5
absolute and relative (observed: about 5e-7), gradients 1e-7 absolute and 1e-4 relative (observed:
about 1e-8); three AdamW steps' losses, 1e-6 relative (observed: equal to rounding).
"""
from __future__ import annotations

import copy

import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, token_batch
from peftlab import core
from peftlab.methods.lora import StackedLoRA

ATOL = RTOL = 1e-5  # float32 outputs, fused vs unfused
GRAD_ATOL, GRAD_RTOL = 1e-7, 1e-4  # float32 gradients (some are ~1e-5 themselves; observed differences ~1e-8)
SITE = "encoder.layer.0.attention.self.query"


@pytest.fixture
def stacked_calls(monkeypatch):
    """Counts the forwards that took the stacked path."""
    calls = []
    apply = StackedLoRA.apply

    def counted(*args):
        calls.append(1)
        return apply(*args)

    monkeypatch.setattr(StackedLoRA, "apply", counted)
    return calls


def attached(config, fused: bool, seed: int = 0, make=tiny_bert, name: str = "default"):
    """A model with `config` attached, stacked (fused) or not; trained values moved off init, the same
    for both (B != 0)."""
    model = make(seed)
    default, core.FUSED = core.FUSED, fused
    try:
        peftlab.attach(model, config, name=name)
    finally:
        core.FUSED = default
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in sorted(peftlab.trainable_parameters(model).items()):
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def site_of(model, site: str = SITE):
    host = model.get_submodule(site)
    return host, host.adapters["default"]


def is_stacked(model, site: str = SITE) -> bool:
    host, adapter = site_of(model, site)
    return core.stacked_matrix(host.weight, adapter.A) is not None


def fixed_target(model, batch) -> torch.Tensor:
    # a loss against a fixed random target: a LayerNorm output's own square mean is ~1 whatever A, B are
    shape = (*batch["input_ids"].shape, model.config.hidden_size)  # BertModel's last hidden state
    return torch.randn(shape, generator=torch.Generator().manual_seed(11))


def outputs_and_grads(model, batch):
    target = fixed_target(model, batch)
    out = output_of(model, batch)
    (out - target).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in peftlab.trainable_parameters(model).items()}
    assert min(g.norm() for g in grads.values()) > 1e-6  # every factor gets a gradient
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


# ---- the autograd function -----------------------------------------------------------------

def two_pass(x, W, A, B, bias, scale):
    """The LoRA equation as the chain computes it: x W^T + b + s (x A^T) B^T."""
    return x @ W.T + bias + scale * (x @ A.T) @ B.T


@pytest.mark.parametrize("with_bias", [True, False])
def test_stacked_lora_gradients_match_finite_differences_and_the_two_pass_formula(with_bias):
    g = torch.Generator().manual_seed(0)
    out, inp, r, s = 6, 5, 3, 1.7
    W = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = torch.randn(2, 4, inp, generator=g, dtype=torch.float64, requires_grad=True)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64, requires_grad=True)
    B = torch.randn(out, r, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None

    def fused(x, A, B, bias):
        stacked = torch.cat([W, A.detach()])  # [W; A] as the buffer holds it, rebuilt per perturbation
        return StackedLoRA.apply(x, A, B, bias, stacked, s)

    inputs = (x, A, B, bias)
    assert torch.autograd.gradcheck(fused, inputs)

    y = fused(*inputs)
    reference = two_pass(x, W, A, B, bias if with_bias else 0.0, s)
    torch.testing.assert_close(y, reference, atol=1e-10, rtol=1e-10)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    wrt = [t for t in inputs if t is not None]
    for got, want in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(reference, wrt, dy)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


# ---- a whole model, fused vs unfused ---------------------------------------------------------

@pytest.mark.parametrize("config", [peftlab.LoRA(r=4, targets="all-linear"),
                                    peftlab.DoRA(r=4, targets="all-linear")], ids=["lora", "dora"])
def test_forward_and_gradients_equal_the_unfused_path(config, stacked_calls):
    batch = token_batch()
    fused, unfused = attached(config, True), attached(config, False)
    sites = len(peftlab.adapters(fused, "default"))
    assert all(is_stacked(fused, s) for s in peftlab.adapters(fused, "default"))
    assert not is_stacked(unfused)
    for mode in ("train", "eval"):
        fused.train(mode == "train"), unfused.train(mode == "train")
        torch.manual_seed(3)  # the model's own dropout draws the same masks in both
        out_f, grads_f = outputs_and_grads(fused, batch)
        calls = len(stacked_calls)
        torch.manual_seed(3)
        out_u, grads_u = outputs_and_grads(unfused, batch)
        assert calls == sites and len(stacked_calls) == sites  # every site of the fused model, none of the other
        stacked_calls.clear()
        torch.testing.assert_close(out_f, out_u, atol=ATOL, rtol=RTOL)
        assert grads_f.keys() == grads_u.keys()
        for k in grads_f:
            torch.testing.assert_close(grads_f[k], grads_u[k], atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=k)


def adamw_losses(model, batch, steps: int = 3) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(peftlab.param_groups(model, 1e-2))
    target = fixed_target(model, batch)
    losses = []
    for step in range(steps):
        torch.manual_seed(step)
        loss = (output_of(model, batch) - target).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_three_adamw_steps_give_the_same_losses_and_keep_the_buffer():
    batch = token_batch()
    config = peftlab.LoRA(r=4, targets="all-linear")
    fused, unfused = attached(config, True), attached(config, False)
    host, adapter = site_of(fused)
    w_before, a_before = host.weight.detach().clone(), adapter.A.detach().clone()
    losses_f, losses_u = adamw_losses(fused, batch), adamw_losses(unfused, batch)
    assert losses_f == pytest.approx(losses_u, rel=1e-6)
    assert losses_f[-1] < losses_f[0]
    # The optimizer's in-place updates of A landed in the buffer; W0's bytes did not move.
    stacked = core.stacked_matrix(host.weight, adapter.A)
    assert stacked is not None
    assert torch.equal(host.weight, w_before) and torch.equal(stacked[: w_before.shape[0]], w_before)
    assert not torch.equal(adapter.A, a_before) and torch.equal(stacked[w_before.shape[0]:], adapter.A)
    torch.testing.assert_close(site_of(unfused)[1].A, adapter.A, atol=ATOL, rtol=RTOL)


# ---- where the chain must run instead ---------------------------------------------------------

def same_output(fused, unfused, batch, stacked_calls, expect_stacked: bool) -> None:
    with torch.no_grad():
        out_f = output_of(fused, batch)
        taken = len(stacked_calls)
        out_u = output_of(unfused, batch)
    assert (taken > 0) == expect_stacked
    torch.testing.assert_close(out_f, out_u, atol=ATOL, rtol=RTOL)


BREAKS = {
    "to-float64": lambda m: m.to(torch.float64),
    "load-assign": lambda m: m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True),
    "data-assigned": lambda m: [setattr(p, "data", p.data.clone()) for p in m.parameters()],
}


@pytest.mark.parametrize("name", BREAKS)
def test_what_breaks_the_buffer_falls_back_to_the_chain(name, stacked_calls):
    batch = token_batch()
    config = peftlab.LoRA(r=4, targets="all-linear")
    fused, unfused = attached(config, True), attached(config, False)
    BREAKS[name](fused), BREAKS[name](unfused)
    assert not is_stacked(fused)
    same_output(fused, unfused, batch, stacked_calls, expect_stacked=False)
    peftlab.detach(fused)
    assert site_of_plain(fused).untyped_storage().nbytes() == site_of_plain(fused).numel() * site_of_plain(
        fused).element_size()


def test_a_deep_copy_takes_the_chain(stacked_calls):
    # nn.Parameter's deepcopy clones each parameter on its own: the copy's W and A are two storages
    model = attached(peftlab.LoRA(r=4, targets="all-linear"), False)
    clone = copy.deepcopy(attached(peftlab.LoRA(r=4, targets="all-linear"), True))
    assert not is_stacked(clone)
    same_output(clone, model, token_batch(), stacked_calls, expect_stacked=False)


def site_of_plain(model):
    return model.get_submodule(SITE).weight


def test_merge_and_unmerge_write_through_the_buffer(stacked_calls):
    batch = token_batch()
    model = attached(peftlab.LoRA(r=4, targets="all-linear"), True)
    host, adapter = site_of(model)
    w0 = host.weight.detach().clone()
    with torch.no_grad():
        unmerged = output_of(model, batch)
    peftlab.merge(model)
    assert is_stacked(model)  # merge wrote into W's rows of the buffer
    torch.testing.assert_close(core.stacked_matrix(host.weight, adapter.A)[: w0.shape[0]],
                               w0 + adapter.delta_weight().detach())
    stacked_calls.clear()
    with torch.no_grad():
        merged = output_of(model, batch)
    assert not stacked_calls  # merged: the host's own forward
    torch.testing.assert_close(merged, unmerged, atol=ATOL, rtol=RTOL)
    peftlab.unmerge(model)
    assert torch.equal(host.weight, w0) and is_stacked(model)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), unmerged, atol=0, rtol=0)
    assert stacked_calls


def test_dropout_in_training_takes_the_chain_and_eval_the_stacked_path(stacked_calls):
    batch = token_batch()
    config = peftlab.LoRA(r=4, dropout=0.3, targets="all-linear")
    fused, unfused = attached(config, True), attached(config, False)
    assert is_stacked(fused)
    fused.train(), unfused.train()
    torch.manual_seed(5)
    out_f = output_of(fused, batch)
    assert not stacked_calls
    torch.manual_seed(5)
    torch.testing.assert_close(out_f, output_of(unfused, batch), atol=ATOL, rtol=RTOL)
    fused.eval(), unfused.eval()
    same_output(fused, unfused, batch, stacked_calls, expect_stacked=True)


def test_two_adapters_on_a_site_take_the_chain(stacked_calls):
    batch = token_batch()
    models = []
    for fused in (True, False):
        model = attached(peftlab.LoRA(r=4, targets="all-linear"), fused)
        default, core.FUSED = core.FUSED, fused
        peftlab.attach(model, peftlab.LoRA(r=2, init="gaussian", targets="all-linear"), name="second")
        core.FUSED = default
        with torch.no_grad():
            for p in peftlab.adapters(model, "second")[SITE].parameters():
                p.fill_(0.05)
        models.append(model)
    fused, unfused = models
    same_output(fused, unfused, batch, stacked_calls, expect_stacked=False)
    peftlab.set_active(fused, "second"), peftlab.set_active(unfused, "second")
    same_output(fused, unfused, batch, stacked_calls, expect_stacked=False)  # "second" was not stacked
    peftlab.set_active(fused, "default"), peftlab.set_active(unfused, "default")
    same_output(fused, unfused, batch, stacked_calls, expect_stacked=True)
    peftlab.detach(fused, "default")  # the stacked one goes first: W gets its own storage back
    assert site_of_plain(fused).untyped_storage().nbytes() == site_of_plain(fused).numel() * 4


def test_mixed_batches_and_disabled_take_the_chain(stacked_calls):
    batch = token_batch()
    config = peftlab.LoRA(r=4, targets="all-linear")
    fused, unfused = attached(config, True), attached(config, False)
    with peftlab.per_example(fused, ["default", None, "default"]), \
            peftlab.per_example(unfused, ["default", None, "default"]):
        same_output(fused, unfused, batch, stacked_calls, expect_stacked=False)
    with peftlab.disabled(fused), peftlab.disabled(unfused):
        same_output(fused, unfused, batch, stacked_calls, expect_stacked=False)


def test_autocast_and_the_switch_turn_the_stacked_path_off(monkeypatch):
    # (the chain itself does not run under CPU autocast: its in-place addmm mixes dtypes; hence one slot)
    model = attached(peftlab.LoRA(r=4, targets="all-linear"), True)
    host, adapter = site_of(model)
    x = torch.randn(2, 5, host.in_features)
    slot = host.adapters
    assert slot._stacked_forward(adapter, x) is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert slot._stacked_forward(adapter, x) is None
    monkeypatch.setattr(core, "FUSED", False)
    assert slot._stacked_forward(adapter, x) is None


def test_a_quantized_host_is_not_stacked(stacked_calls):
    from peftlab import quantize

    model = tiny_bert()
    quantize.quantize(model, "int8")
    peftlab.attach(model, peftlab.LoRA(r=4, init="gaussian", targets="all-linear"))
    with torch.no_grad():
        output_of(model, token_batch())
    quantized = [s for s in peftlab.adapters(model, "default") if quantize.is_quantized(model.get_submodule(s))]
    assert quantized and not stacked_calls
    assert all(core._slot(model.get_submodule(s)).stacked is None for s in quantized)


# ---- detach ------------------------------------------------------------------------------------

def test_detach_leaves_plain_weights_and_the_state_dict_byte_equal():
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = dict(model.named_parameters())
    peftlab.attach(model, peftlab.LoRA(r=4, targets="all-linear"))
    assert is_stacked(model)
    peftlab.detach(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    for n, p in model.named_parameters():
        assert p is params_before[n]  # the same parameter objects
        assert p.is_contiguous() and p.storage_offset() == 0
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), f"{n} is a view into a larger buffer"
