"""ALLoRA: contract rows, the update rescaling under AdamW (direction and size), equality with
LoRA (s = 1, no dropout) when the step hook is not called, the reference after loading, bad input."""
import math

import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_cnn, tiny_gpt2, image_batch, token_batch
from contract import Case, run_contract
from peftlab.methods.allora import rate

QV = ["query", "value"]

ROWS = [
    Case("allora-linear", lambda: peftlab.ALLoRA(r=4, targets=QV), tiny_bert, token_batch),
    Case("allora-matrix-linear-form", lambda: peftlab.config("allora", r=4, granularity="matrix", form="linear",
                                                             targets="all-linear"), tiny_bert, token_batch),
    Case("allora-conv1d", lambda: peftlab.ALLoRA(r=4, targets=["c_attn", "c_fc"]), tiny_gpt2, token_batch),
    Case("allora-conv2d", lambda: peftlab.ALLoRA(r=2, targets=["conv1", "conv2"]), tiny_cnn, image_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


# ---- helpers -------------------------------------------------------------------------------

def _pair(eta=4.0, **fields):
    """LoRA with s = 1 and no dropout, and ALLoRA, on two copies of one model with the same A."""
    torch.manual_seed(7)
    lora = peftlab.attach(tiny_bert(), peftlab.LoRA(r=4, alpha=4, dropout=0.0, targets=QV))
    torch.manual_seed(7)
    allora = peftlab.attach(tiny_bert(), peftlab.ALLoRA(r=4, eta=eta, targets=QV, **fields))
    for a, b in zip(peftlab.adapters(lora, "default").values(), peftlab.adapters(allora, "default").values()):
        assert a.scale == b.scale == 1.0 and torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    return lora, allora


def _params(model):
    return {k: p.detach().clone() for k, p in peftlab.trainable_parameters(model).items()}


def _train(model, steps, hook, lr=1e-2, optimizer=None):
    """AdamW steps on one fixed batch; peftlab.step after each when `hook`. Returns the optimizer."""
    model.eval()  # no dropout anywhere: the two models of a pair see the same gradients
    optimizer = optimizer or torch.optim.AdamW(peftlab.param_groups(model, lr), lr=lr)
    batch = token_batch()
    for i in range(steps):
        output_of(model, batch).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if hook:
            peftlab.step(model, i)
    return optimizer


# ---- the coefficient -----------------------------------------------------------------------

def test_rate_is_eta_at_zero_and_inverse_norm_when_large():
    norms = torch.tensor([0.0, 1.0, 1e4])
    for form in ("sqrt", "linear"):
        c = rate(norms, eta=4.0, form=form)
        assert c[0].item() == pytest.approx(4.0)
        assert c[2].item() == pytest.approx(1e-4, rel=1e-3)
        assert c[0] > c[1] > c[2]
    assert rate(norms, 4.0, "sqrt")[1].item() == pytest.approx(1 / math.sqrt(1 + 1 / 16))
    assert rate(norms, 4.0, "linear")[1].item() == pytest.approx(1 / (1 + 1 / 4))


# ---- the update under AdamW ----------------------------------------------------------------

def test_first_step_moves_zero_B_eta_times_further_than_lora():
    lora, allora = _pair(eta=4.0)
    before = _params(lora)
    _train(lora, 1, hook=False)
    _train(allora, 1, hook=True)
    lora_after, allora_after = _params(lora), _params(allora)
    for key in before:
        step_lora, step_allora = lora_after[key] - before[key], allora_after[key] - before[key]
        if key.endswith(".B"):  # B = 0: c = 1 / sqrt(0 + 1/eta^2) = eta
            assert step_lora.abs().max() > 0
            torch.testing.assert_close(step_allora, 4.0 * step_lora, atol=1e-7, rtol=1e-5)
        else:  # A: each row's step (here AdamW's decay alone: B = 0 gives A no gradient) scaled by c(||row||)
            c = rate(torch.linalg.vector_norm(before[key], dim=1, keepdim=True), 4.0, "sqrt")
            torch.testing.assert_close(step_allora, c * step_lora, atol=1e-7, rtol=1e-5)  # steps ~1e-5


def test_from_the_same_state_large_groups_are_damped_and_small_ones_sped_up():
    lora, allora = _pair(eta=4.0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same trained-looking state in both: B non-zero, row 0 of A large
        for m in (lora, allora):
            g.manual_seed(3)
            for a in peftlab.adapters(m, "default").values():
                a.B.copy_(0.05 * torch.randn(a.B.shape, generator=g))
                a.A[0].mul_(20.0)
                a.B[:, 1].mul_(1e-3)  # one column of B near zero
            if m is allora:
                for a in peftlab.adapters(m, "default").values():
                    a.remember()
    before = _params(lora)
    _train(lora, 1, hook=False)  # same state, same gradients, fresh AdamW: the same raw step in both
    _train(allora, 1, hook=True)
    for key, start in before.items():
        step_lora = _params(lora)[key] - start
        step_allora = _params(allora)[key] - start
        group_dim = 1 if key.endswith(".A") else 0
        ratio = (torch.linalg.vector_norm(step_allora, dim=group_dim)
                 / torch.linalg.vector_norm(step_lora, dim=group_dim))  # one per row of A / column of B
        expected = rate(torch.linalg.vector_norm(start, dim=group_dim), 4.0, "sqrt")
        torch.testing.assert_close(ratio, expected, atol=0, rtol=1e-3)  # fp32 differences of ~0.5-sized values
        if key.endswith(".A"):
            assert ratio[0] < 0.2 and (ratio[1:] > 1).all()  # |row 0| ~ 11.5: damped; |row| ~ 0.58: faster
        else:
            assert ratio[1] > 3.9  # the near-zero column moves at about eta times the optimizer's step


def test_B_escapes_zero_faster_than_lora_over_several_steps():
    lora, allora = _pair(eta=4.0)
    _train(lora, 3, hook=False, lr=1e-3)
    _train(allora, 3, hook=True, lr=1e-3)
    for a, b in zip(peftlab.adapters(lora, "default").values(), peftlab.adapters(allora, "default").values()):
        assert b.B.norm() > 2 * a.B.norm()


def test_without_the_step_hook_it_trains_exactly_like_lora_with_s_1():
    lora, allora = _pair(eta=4.0)
    _train(lora, 3, hook=False)
    _train(allora, 3, hook=False)
    ours, theirs = _params(allora), _params(lora)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # ... and with the hook the trajectories part
    lora, allora = _pair(eta=4.0)
    _train(lora, 3, hook=False)
    _train(allora, 3, hook=True)
    assert not torch.allclose(_params(allora)[next(iter(ours))], _params(lora)[next(iter(ours))])


def test_matrix_granularity_scales_a_whole_factor_by_one_coefficient():
    lora, allora = _pair(eta=2.0, granularity="matrix", form="linear")
    before = _params(lora)
    _train(lora, 1, hook=False)
    _train(allora, 1, hook=True)
    for key, start in before.items():
        c = rate(torch.linalg.vector_norm(start), 2.0, "linear")
        torch.testing.assert_close(_params(allora)[key] - start, c * (_params(lora)[key] - start),
                                   atol=1e-7, rtol=1e-5)


def test_loading_makes_the_loaded_values_the_reference(tmp_path):
    model = peftlab.attach(tiny_bert(), peftlab.ALLoRA(r=4, targets=QV))
    _train(model, 2, hook=True)
    saved = {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}
    assert not any(k.endswith("_prev") for k in saved)  # the reference is never saved
    fresh = peftlab.attach(tiny_bert(), peftlab.ALLoRA(r=4, targets=QV), state_dict=saved)
    for a in peftlab.adapters(fresh, "default").values():
        assert torch.equal(a.A_prev, a.A) and torch.equal(a.B_prev, a.B)
        assert a.B.abs().max() > 0
    # a step from the loaded state is rescaled relative to the loaded values, not to zero
    start = _params(fresh)
    _train(fresh, 1, hook=True, lr=1e-4)
    for k, v in _params(fresh).items():
        assert (v - start[k]).abs().max() < 1e-3


# ---- bad input -----------------------------------------------------------------------------

def test_bad_configs_are_refused_with_the_fix():
    with pytest.raises(peftlab.PeftlabError, match="positive integer"):
        peftlab.ALLoRA(r=0)
    with pytest.raises(peftlab.PeftlabError, match="eta must be a positive finite"):
        peftlab.ALLoRA(eta=0)
    with pytest.raises(peftlab.PeftlabError, match="granularity 'row'.*'vector', 'matrix'"):
        peftlab.ALLoRA(granularity="row")
    with pytest.raises(peftlab.PeftlabError, match="form 'log'.*'sqrt', 'linear'"):
        peftlab.ALLoRA(form="log")
    with pytest.raises(peftlab.PeftlabError, match="r <= 32"):
        peftlab.attach(tiny_bert(), peftlab.ALLoRA(r=33, targets=QV))
    with pytest.raises(peftlab.PeftlabError, match="unknown field"):
        peftlab.config("allora", alpha=16)  # no scaling factor to set


def test_registry_declares_the_step_hook_and_round_trips_json():
    cfg = peftlab.config("allora", r=4, eta=2.0, granularity="matrix", targets=QV)
    assert isinstance(cfg, peftlab.ALLoRA) and cfg.step_hook
    assert peftlab.from_json(cfg.to_json()) == cfg
