"""Optimizers by name: GaLore against the official `galore-torch`, every optimizer's first steps
against its equation written out here, the registry's checks, and the train config and recipe
(the full-galore/full-fira/full-frugal baselines, SAM's second pass in the Trainer)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import peftlab
from peftlab import PeftlabError
from peftlab.optim import Fira, Frugal, GaLore, SAM, optimizer
from peftlab.optim.fira import limit_growth

NAMES = ["adafactor", "adam_atan2", "adamw", "fira", "frugal", "galore", "sam", "sgd"]


def params(*shapes, seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s)) for s in shapes]


def give(ps, grads):
    for p, g in zip(ps, grads):
        p.grad = g.clone()


def adam_first_direction(g, eps):
    """Adam's M / (sqrt(V) + eps) at step 1 (M = 0.1 g, V = 0.001 g^2), times the step's correction."""
    m, v = 0.1 * g, 0.001 * g * g
    return m / (v.sqrt() + eps) * math.sqrt(1 - 0.999) / (1 - 0.9)


# ---- the registry ----------------------------------------------------------------------------


def test_every_name_is_registered_listed_and_builds_a_torch_optimizer():
    assert list(peftlab.optimizers()) == NAMES and all(peftlab.optimizers().values())
    for name in NAMES:
        fields = {"rank": 2} if name in ("galore", "fira") else {}
        built = peftlab.optimizer(name, params((4, 3)), lr=1e-2, **fields)
        assert isinstance(built, torch.optim.Optimizer), name


@pytest.mark.parametrize("name, fields, message", [
    ("adamz", {}, r"unknown optimizer 'adamz'; registered optimizers: adafactor, adam_atan2, adamw"),
    ("galore", {"rnak": 2}, r"optimizer 'galore': unknown field\(s\) \['rnak'\]; allowed: lr, rank"),
    ("galore", {"rank": 0}, r"optimizer 'galore' field rank = 0 must be > 0"),
    ("galore", {"proj_type": "up"}, r"field proj_type = 'up' must be one of std, left, right"),
    ("frugal", {"density": 1.5}, r"field density = 1.5 must be in \(0, 1\]"),
    ("fira", {"gamma": 0.5}, r"field gamma = 0.5 must be >= 1"),
    ("adamw", {"betas": [0.9, 1.5]}, r"field betas = \[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    ("adam_atan2", {"lr": float("nan")}, r"field lr = nan is not finite"),
    ("sgd", {"momentum": "high"}, r"field momentum = 'high' has the wrong type: give a number"),
    ("sam", {"base": "adamw", "base_fields": {"weight_decay": -1}}, r"sam' base 'adamw'.*weight_decay = -1"),
])
def test_bad_fields_are_refused_naming_the_field_before_any_parameter_changes(name, fields, message):
    p = params((4, 3))[0]
    before = p.detach().clone()
    with pytest.raises(PeftlabError, match=message):
        peftlab.optimizer(name, [p], **fields)
    assert torch.equal(p, before)


def test_a_galore_rank_larger_than_a_matrix_is_refused_when_the_parameters_are_known():
    with pytest.raises(PeftlabError, match=r"GaLore rank 5 is larger than a \(4, 3\) parameter allows \(parameter 1 "
                                           r"of group 0\): use optimizer.rank <= 3, or put it in a group with project"):
        optimizer("galore", params((8, 8), (4, 3)), rank=5)
    # the same matrix in a `project: False` group trains unprojected, with full-size Adam state
    small, big = params((4, 3), (8, 8))
    opt = optimizer("fira", [{"params": [big]}, {"params": [small], "project": False}], rank=5)
    give([small, big], [torch.ones(4, 3), torch.ones(8, 8)])
    opt.step()
    assert opt.state[small]["exp_avg"].shape == (4, 3) and opt.state[big]["exp_avg"].shape == (8, 5)


# ---- GaLore ----------------------------------------------------------------------------------


def test_galore_matches_the_official_galore_torch_step_for_step():
    """Same parameters and gradients: galore-torch's GaLoreAdamW and ours agree to 1e-6 over 6 steps
    (a projector refresh every 2 steps, a tall and a wide matrix, an unprojected vector, weight decay)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from galore_torch import GaLoreAdamW
    shapes = [(12, 8), (6, 10), (5,)]
    theirs, ours = params(*shapes), params(*shapes)
    official = GaLoreAdamW([{"params": theirs[:2], "rank": 3, "update_proj_gap": 2, "scale": 0.5, "proj_type": "std"},
                            {"params": theirs[2:]}], lr=1e-2, weight_decay=0.1, no_deprecation_warning=True)
    mine = optimizer("galore", [{"params": ours[:2]}, {"params": ours[2:]}], lr=1e-2, rank=3, update_proj_gap=2,
                     scale=0.5, weight_decay=0.1)
    start = [p.detach().clone() for p in ours]
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        grads = [torch.randn(*s, generator=generator) for s in shapes]
        give(theirs, grads), give(ours, grads)
        official.step(), mine.step()
        for a, b in zip(theirs, ours):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
    assert all((p - s).abs().max() > 1e-3 for p, s in zip(ours, start))  # they moved


@pytest.mark.parametrize("shape", [(10, 4), (4, 10)])
def test_galore_first_step_is_the_explicit_projection_on_the_smaller_side(shape):
    (p,) = params(shape)
    w0 = p.detach().clone()
    g = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    give([p], [g])
    opt = optimizer("galore", [p], lr=0.1, rank=2, scale=0.25, eps=1e-6)
    opt.step()
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    if shape[0] < shape[1]:  # wide: P = U[:, :2] on the left, state (2, n)
        P = U[:, :2]
        expected = w0 - 0.1 * 0.25 * P @ adam_first_direction(P.T @ g, 1e-6)
        state_shape = (2, shape[1])
    else:  # tall: Q = V^T[:2] on the right, state (m, 2)
        Q = Vh[:2]
        expected = w0 - 0.1 * 0.25 * adam_first_direction(g @ Q.T, 1e-6) @ Q
        state_shape = (shape[0], 2)
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)
    assert opt.state[p]["exp_avg"].shape == state_shape


# ---- Fira ------------------------------------------------------------------------------------


def test_fira_first_step_adds_the_norm_scaled_residual():
    (p,) = params((4, 9))
    w0 = p.detach().clone()
    g = torch.randn(4, 9, generator=torch.Generator().manual_seed(4))
    give([p], [g])
    optimizer("fira", [p], lr=0.1, rank=2, scale=0.25, eps=1e-6).step()
    P = torch.linalg.svd(g, full_matrices=False)[0][:, :2]  # wide: left projection
    R = P.T @ g  # (2, 9)
    N = 0.1 * R / ((0.001 * R * R).sqrt() + 1e-6)  # Adam's M / (sqrt(V) + eps) at step 1
    phi = N.norm(dim=0) / (R.norm(dim=0) + 1e-8)  # one per column
    residual = (g - P @ R) * phi
    step = 0.1 * math.sqrt(1 - 0.999) / (1 - 0.9)
    torch.testing.assert_close(p.detach(), w0 - step * (0.25 * P @ N + residual), atol=1e-6, rtol=0)


def test_fira_limiter_caps_the_residual_norm_growth_at_gamma():
    state: dict = {}
    first = limit_growth(state, torch.ones(3, 3), gamma=1.01)
    assert first.norm().item() == pytest.approx(3.0)
    grown = limit_growth(state, 10 * torch.ones(3, 3), gamma=1.01)  # would be 10x: capped at 1.01x
    assert grown.norm().item() == pytest.approx(3.0 * 1.01)
    assert limit_growth(state, 0.5 * torch.ones(3, 3), gamma=1.01).norm().item() == pytest.approx(1.5)  # shrinking passes
    # in the optimizer: a gradient 10x the last one grows the residual's norm by 1.01 only
    (p,) = params((4, 9))
    opt = Fira([p], lr=0.1, rank=2)
    g = torch.randn(4, 9, generator=torch.Generator().manual_seed(5))
    give([p], [g])
    opt.step()
    norm_before = opt.state[p]["residual_norm"]
    give([p], [10 * g])
    opt.step()
    assert opt.state[p]["residual_norm"] == pytest.approx(1.01 * norm_before)


# ---- FRUGAL ----------------------------------------------------------------------------------


def test_frugal_blocks_give_adam_to_a_density_share_and_sign_descent_to_the_rest():
    ps = params(*[(3, 4)] * 4)
    start = [p.detach().clone() for p in ps]
    grads = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    give(ps, grads)
    opt = Frugal(ps, lr=0.1, density=0.5, free_lr_scale=0.3, eps=1e-8)
    opt.step()
    stateful = [i for i, p in enumerate(ps) if "exp_avg" in opt.state[p]]
    assert len(stateful) == 2  # density 0.5 of 4 blocks
    for i, (p, w0, g) in enumerate(zip(ps, start, grads)):
        expected = w0 - 0.1 * adam_first_direction(g, 1e-8) if i in stateful else w0 - 0.1 * 0.3 * g.sign()
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_frugal_coordinates_and_svd_split_one_matrix():
    g = torch.randn(6, 8, generator=torch.Generator().manual_seed(7))
    (p,) = params((6, 8))
    w0 = p.detach().clone()
    give([p], [g])
    opt = Frugal([p], lr=0.1, density=0.25, projection="coordinates", free_lr_scale=0.3)
    opt.step()
    chosen = opt.state[p]["coordinates"]
    assert chosen.numel() == 12 and opt.state[p]["exp_avg"].shape == (12,)  # a quarter of 48 entries
    mask = torch.zeros(48, dtype=torch.bool)
    mask[chosen] = True
    mask = mask.view(6, 8)
    expected = torch.where(mask, w0 - 0.1 * adam_first_direction(g, 1e-8), w0 - 0.1 * 0.3 * g.sign())
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)

    (p,) = params((6, 8))
    w0 = p.detach().clone()
    give([p], [g])
    Frugal([p], lr=0.1, density=0.34, projection="svd", free_lr_scale=0.3).step()  # r = round(0.34 * 6) = 2
    P = torch.linalg.svd(g, full_matrices=False)[0][:, :2]
    R = P.T @ g
    expected = w0 - 0.1 * P @ adam_first_direction(R, 1e-8) - 0.1 * 0.3 * (g - P @ R).sign()
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_frugal_switches_blocks_every_update_gap_steps_and_resets_their_state():
    ps = params(*[(3, 4)] * 8)
    opt = Frugal(ps, lr=0.01, density=0.25, update_gap=2, seed=3)
    chosen = []
    for _ in range(6):
        give(ps, [torch.ones(3, 4)] * 8)
        opt.step()
        chosen.append({i for i, p in enumerate(ps) if "exp_avg" in opt.state[p]})
    assert chosen[0] == chosen[1] and chosen[2] == chosen[3] and len(chosen[0]) == 2
    assert chosen[0] != chosen[2] or chosen[2] != chosen[4]  # random blocks change (seeded)
    assert all(opt.state[ps[i]]["step"] == 2 for i in chosen[5])  # moments restart at each switch


# ---- Adam-atan2 and SAM ----------------------------------------------------------------------


def test_adam_atan2_follows_its_formula_for_three_steps():
    (p,) = params((5,))
    w = p.detach().clone()
    opt = optimizer("adam_atan2", [p], lr=0.01, weight_decay=0.1, a=1.27, b=1.5)
    m = v = torch.zeros(5)
    for t in range(1, 4):
        g = torch.randn(5, generator=torch.Generator().manual_seed(t))
        give([p], [g])
        opt.step()
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        w = w * (1 - 0.01 * 0.1) - 0.01 * 1.27 * torch.atan2(m_hat, 1.5 * v_hat.sqrt())
        torch.testing.assert_close(p.detach(), w, atol=1e-7, rtol=0)


def quadratic(w):
    return (torch.tensor([1.0, 3.0, -2.0]) * w * w).sum() + w.sum() ** 3


def test_sam_steps_from_w_with_the_gradient_at_the_perturbed_point():
    (p,) = params((3,))
    w0 = p.detach().clone()
    opt = optimizer("sam", [p], lr=0.1, rho=0.2, base="sgd")
    quadratic(p).backward()

    def closure():
        loss = quadratic(p)
        loss.backward()
        return loss

    opt.step(closure)
    w = w0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(quadratic(w), w)
    e = 0.2 * g / g.norm()
    w_adv = (w0 + e).requires_grad_(True)
    (g_adv,) = torch.autograd.grad(quadratic(w_adv), w_adv)
    torch.testing.assert_close(p.detach(), w0 - 0.1 * g_adv, atol=1e-6, rtol=0)
    with pytest.raises(PeftlabError, match="SAM.step needs the gradient at the perturbed weights"):
        opt.step()  # no perturbation in flight: refusing beats a silent plain step


def test_sam_state_is_its_base_optimizers():
    (p,) = params((3,))
    opt = SAM([p], lambda groups: torch.optim.AdamW(groups, lr=0.1), rho=0.05)
    quadratic(p).backward()
    opt.perturb()
    quadratic(p).backward()
    opt.step()
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.param_groups is opt.base.param_groups


# ---- the train config and the recipe ---------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer.name": "galore", "optimizer.rank": 0}, r"config key optimizer: optimizer 'galore' field rank = 0"),
    ({"optimizer.name": "galore", "optimizer.rnak": 4}, r"unknown config key\(s\) optimizer.rnak; optimizer allows"),
    ({"optimizer.name": "sam", "train.grad_accum": 2}, r"train.grad_accum = 2: optimizer sam takes two gradients"),
    ({"method.name": "full-galore"}, r"method full-galore is full fine-tuning with optimizer galore; set optimizer"),
    ({"optimizer.name": "sam", "optimizer.base_fields": [1]}, r"optimizer.base_fields = \[1\] has the wrong shape"),
])
def test_the_train_config_refuses_bad_optimizer_sections_before_any_model_loads(overrides, message):
    from peftlab.recipe import config

    data = config.default_dict()
    for key, value in overrides.items():
        data = config.merge(data, config.parse_override(f"{key}={value}"))
    if data["method"]["name"].startswith("full"):
        data["method"] = {"name": data["method"]["name"]}
    with pytest.raises(PeftlabError, match=message):
        config.validate(data)


def test_torch_class_names_still_work_and_registered_fields_are_kept():
    from peftlab.recipe import config

    assert config.build(None, ["optimizer.name=AdamW"]).optimizer["name"] == "AdamW"
    run = config.build(None, ["optimizer.name=RMSprop", "optimizer.alpha=0.9"])
    assert config.optimizer_class(run.optimizer["name"]) is torch.optim.RMSprop
    run = config.build(None, ["optimizer.name=galore", "optimizer.rank=4", "method.name=full"])
    assert run.optimizer == {"name": "galore", "lr": 2e-3, "weight_decay": 0.0, "rank": 4}


def test_full_galore_projects_only_the_linear_weights_outside_the_head():
    from conftest import tiny_bert
    from peftlab.recipe import adaptation, loop

    model = tiny_bert()
    model.classifier = torch.nn.Linear(model.config.hidden_size, 2)
    adapted = adaptation.baseline("full-galore", model, head="classifier")
    opt = loop.build_optimizer({"name": "galore", "lr": 1e-3, "rank": 4}, adapted)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = sorted(names[id(p)] for p in opt.param_groups[0]["params"])
    assert projected and all(n.endswith(".weight") and "embeddings" not in n and "LayerNorm" not in n
                             and not n.startswith("classifier") for n in projected)
    assert opt.param_groups[1]["project"] is False and isinstance(opt, GaLore)
    assert len(projected) + len(opt.param_groups[1]["params"]) == len(list(model.parameters()))


def test_training_runs_full_frugal_and_sam_with_its_second_pass(tmp_path, monkeypatch):
    from peftlab.recipe import config, trainer
    from run_helpers import step_losses, tiny_checkpoint, tiny_overrides

    model_dir = tiny_checkpoint(tmp_path)
    passes = []
    perturb = SAM.perturb
    monkeypatch.setattr(SAM, "perturb", lambda self: (passes.append(1), perturb(self))[1])
    for name, extra in [("frugal", {"method.name": "full-frugal", "optimizer.name": "frugal"}),
                        ("sam", {"optimizer.name": "sam", "optimizer.rho": 0.05, "train.steps": 3})]:
        overrides = [o for o in tiny_overrides(model_dir, tmp_path / name, **extra)
                     if not (name == "frugal" and o.startswith("method.r="))]
        trainer.train(config.build(None, overrides), echo=lambda *a: None)
        losses = step_losses(tmp_path / name)
        assert losses and all(math.isfinite(v) for v in losses.values())
    assert len(passes) == 3  # one perturbation per SAM step


def test_the_command_lists_every_optimizer(capsys):
    from peftlab import cli

    assert cli.main(["optimizers"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{name} " in out for name in NAMES)


@pytest.mark.parametrize("name, fields", [("galore", {"rank": 2}), ("fira", {"rank": 2}),
                                          ("frugal", {"projection": "coordinates"}), ("frugal", {"projection": "svd"}),
                                          ("sam", {"base": "adam_atan2"})])
def test_a_state_dict_round_trip_continues_the_same_trajectory(name, fields):
    """What a checkpoint keeps (optimizer.state_dict) is enough: a reloaded optimizer steps as the original."""
    shapes = [(6, 4), (3,)]
    a, b = params(*shapes), params(*shapes)
    first, second = optimizer(name, a, lr=0.01, **fields), optimizer(name, b, lr=0.01, **fields)
    generator = torch.Generator().manual_seed(2)

    def step(opt, ps, grads):
        give(ps, grads)
        if isinstance(opt, SAM):
            opt.perturb()
            give(ps, grads)
        opt.step()

    grads = [torch.randn(*s, generator=generator) for s in shapes]
    step(first, a, grads), step(second, b, grads)
    resumed = optimizer(name, b, lr=0.01, **fields)
    resumed.load_state_dict(second.state_dict())
    for _ in range(2):
        grads = [torch.randn(*s, generator=generator) for s in shapes]
        step(first, a, grads), step(resumed, b, grads)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
