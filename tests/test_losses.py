"""peftlab.losses: every loss against its formula written out here (numpy, float64) or the official
code's formula on fixed logits; ALDR-KL's lambda update across visits; reductions, ignored rows,
and bad input named in one line."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import peftlab
from peftlab.errors import PeftlabError
from peftlab.losses import loss, loss_class, losses

# Fixed logits: 5 examples, 4 classes, one confidently wrong row (2) and one confidently right (3).
LOGITS = np.array([[2.0, -1.0, 0.5, 0.0],
                   [0.1, 0.3, -0.2, 1.5],
                   [-3.0, 0.0, 4.0, 1.0],
                   [0.0, 0.0, 0.0, 6.0],
                   [1.0, 2.0, 3.0, -1.0]])
LABELS = np.array([0, 1, 0, 3, 2])
ONE_HOT = np.eye(4)[LABELS]


def call(name, reduction="mean", **fields):
    fn = loss(name, **fields)
    return fn(torch.tensor(LOGITS, dtype=torch.float64), torch.tensor(LABELS), reduction=reduction).numpy()


def softmax(f):
    e = np.exp(f - f.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


P = softmax(LOGITS)
P_Y = P[np.arange(5), LABELS]
CE = -np.log(P_Y)


def test_the_registry_lists_every_loss_of_the_issue_in_order():
    assert losses() == ["cross_entropy", "ldr_kl", "aldr_kl", "gce", "sce", "mae", "nce_rce", "focal", "z_loss"]
    assert peftlab.losses() == losses() and peftlab.loss is loss
    assert [n for n in losses() if loss_class(n).needs_example_ids] == ["aldr_kl"]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_cross_entropy_with_label_smoothing(eps):
    smoothed = (1 - eps) * CE + eps * (-np.log(P)).mean(axis=1)
    np.testing.assert_allclose(call("cross_entropy", "none", label_smoothing=eps), smoothed, rtol=1e-12)


def official_ldr(f, labels, margin, lam, softplus=True):
    """LDRLoss_V1 of the official loss.py, written out (max trick and all), per row."""
    y = np.log1p(np.exp(f)) if softplus else f
    y = y / np.abs(y).mean(axis=1, keepdims=True)
    one_hot = np.eye(f.shape[1])[labels]
    diff = margin * (1 - one_hot) + y - (y * one_hot).sum(axis=1, keepdims=True)
    diff = diff / lam
    top = diff.max(axis=1, keepdims=True)
    return (lam * (np.log(np.exp(diff - top).mean(axis=1, keepdims=True)) + top))[:, 0]


@pytest.mark.parametrize("margin, lam, softplus", [(0.1, 10.0, True), (2.0, 1.0, True), (0.5, 0.3, False)])
def test_ldr_kl_equals_the_official_formula(margin, lam, softplus):
    ours = call("ldr_kl", "none", margin=margin, lam=lam, softplus=softplus)
    np.testing.assert_allclose(ours, official_ldr(LOGITS, LABELS, margin, lam, softplus), rtol=1e-12)


@pytest.mark.parametrize("lam", [0.5, 1.0, 10.0])
def test_ldr_kl_without_margin_is_lambda_scaled_temperature_cross_entropy(lam):
    z = np.log1p(np.exp(LOGITS))
    z = z / z.mean(axis=1, keepdims=True)
    temperature_ce = -np.log(softmax(z / lam)[np.arange(5), LABELS])
    np.testing.assert_allclose(call("ldr_kl", "none", margin=0.0, lam=lam), lam * temperature_ce - lam * math.log(4),
                               rtol=1e-12, atol=1e-12)


def test_ldr_kl_tends_to_the_crammer_singer_hinge_as_lambda_goes_to_zero():
    z = np.log1p(np.exp(LOGITS))
    z = z / z.mean(axis=1, keepdims=True)
    gaps = 0.1 * (1 - ONE_HOT) + z - (z * ONE_HOT).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(call("ldr_kl", "none", margin=0.1, lam=1e-3), gaps.max(axis=1), atol=5e-3)


class OfficialALDR:
    """ALDRLoss_V1 of the official loss.py, written out in numpy (its 1e-5 smoothing of p kept)."""

    def __init__(self, n, margin, lambda0, alpha, softplus):
        self.margin, self.lambda0, self.alpha, self.softplus = margin, lambda0, alpha, softplus
        self.lambdas = np.full(n, lambda0)

    def __call__(self, f, labels, ids):
        k = f.shape[1]
        y = np.log1p(np.exp(f)) if self.softplus else f
        y = y / (np.abs(y).sum(axis=1, keepdims=True) / k)
        p = softmax(y / self.lambdas[ids][:, None]) + 1e-5
        p = p / p.sum(axis=1, keepdims=True)
        kl = (p * np.log(k * p)).sum(axis=1)
        self.lambdas[ids] = self.lambda0 - self.lambda0 * kl / (self.alpha * math.log(k))
        lam = self.lambdas[ids]
        extra = -0.5 * self.alpha * math.log(k) / self.lambda0 * (lam - self.lambda0) ** 2
        return official_ldr(f, labels, self.margin, lam[:, None], softplus=self.softplus) + extra


@pytest.mark.parametrize("lambda0, alpha, softplus", [(10.0, 2.0, True), (1.0, 2.0, False), (0.5, 1.5, False)])
def test_aldr_kl_updates_each_examples_lambda_like_the_official_code(lambda0, alpha, softplus):
    ours = loss("aldr_kl", margin=0.1, lambda0=lambda0, alpha=alpha, softplus=softplus)
    official = OfficialALDR(8, 0.1, lambda0, alpha, softplus)
    visits = [np.array([0, 3, 5, 6, 7]), np.array([5, 0, 1, 2, 3]), np.array([3, 5, 0, 7, 4])]
    for step, ids in enumerate(visits):  # the same rows, seen again under other ids: lambdas carry over
        logits = LOGITS * (1 + 0.5 * step)  # more confident each visit: lambdas move further
        expected = official(logits, LABELS, ids)
        got = ours(torch.tensor(logits), torch.tensor(LABELS), reduction="none", example_ids=torch.tensor(ids))
        np.testing.assert_allclose(got.numpy(), expected, rtol=2e-4, atol=2e-4)
        # tolerance: the official code adds 1e-5 to p before its log, which moves a lambda by up to ~4e-4
        # relative on these peaked rows; ours takes the KL exactly from log_softmax
        np.testing.assert_allclose(ours.lambdas.numpy()[: len(official.lambdas)][sorted(set(ids))],
                                   official.lambdas[sorted(set(ids))], rtol=1e-3)
    assert not np.allclose(official.lambdas[[0, 3, 5]], lambda0)  # the check saw lambdas move
    assert ours.lambdas.numpy()[[1, 2, 4, 6]].min() >= lambda0 * (1 - 1 / alpha) - 1e-9


def test_aldr_kl_lambda_step_by_hand():
    """One visit, one row, two classes: p = softmax(z / lambda0), lambda = lambda0 (1 - KL / (alpha log 2))."""
    fn = loss("aldr_kl", margin=0.0, lambda0=1.0, alpha=2.0, softplus=False)
    logits = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    z = np.array([3.0, -1.0]) / 2.0  # divided by the mean absolute value, 2
    p = np.exp(z) / np.exp(z).sum()
    lam = 1.0 - (p * np.log(2 * p)).sum() / (2 * math.log(2))
    value = fn(logits, torch.tensor([0]), example_ids=torch.tensor([4]))
    ldr = lam * (np.log(np.exp((z - z[0]) / lam).mean()))
    assert fn.lambdas[4].item() == pytest.approx(lam, rel=1e-6) and fn.lambdas[:4].tolist() == [1.0] * 4
    assert value.item() == pytest.approx(ldr - math.log(2) * (lam - 1.0) ** 2, rel=1e-6)


def test_aldr_kl_needs_example_ids_while_training_and_evaluates_without_them():
    fn = loss("aldr_kl")
    logits = torch.tensor(LOGITS, requires_grad=True)
    with pytest.raises(PeftlabError, match="needs example_ids in the batch while training"):
        fn(logits, torch.tensor(LABELS))
    with torch.no_grad():  # evaluation: every row as on its first visit, nothing stored
        first_visit = fn(logits, torch.tensor(LABELS), reduction="none")
    assert len(fn.lambdas) == 0
    trained = fn(logits, torch.tensor(LABELS), reduction="none", example_ids=torch.arange(5))
    torch.testing.assert_close(first_visit, trained.detach())
    trained.sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("q", [0.7, 1.0, 0.05])
def test_gce(q):
    np.testing.assert_allclose(call("gce", "none", q=q), (1 - P_Y ** q) / q, rtol=1e-12)
    if q == 0.05:  # q -> 0: cross entropy
        np.testing.assert_allclose(call("gce", "none", q=q), CE, rtol=0.2)


def official_rce(p, one_hot):
    """RCE as the official SCE and APL code compute it: p clamped at 1e-7, the one-hot label at 1e-4."""
    return -(np.clip(p, 1e-7, 1.0) * np.log(np.clip(one_hot, 1e-4, 1.0))).sum(axis=1)


def test_sce_equals_the_official_formula():
    np.testing.assert_allclose(call("sce", "none", alpha=0.1, beta=1.0), 0.1 * CE + official_rce(P, ONE_HOT),
                               rtol=1e-6)
    np.testing.assert_allclose(call("sce", "none", alpha=1.0, beta=0.5, log_zero=-4.0), CE + 0.5 * 4 * (1 - P_Y),
                               rtol=1e-12)


def test_mae_is_the_absolute_error_of_the_probabilities():
    np.testing.assert_allclose(call("mae", "none"), np.abs(ONE_HOT - P).sum(axis=1), rtol=1e-12)


def test_nce_rce_equals_the_official_formula():
    log_p = np.log(P)
    nce = -(ONE_HOT * log_p).sum(axis=1) / -log_p.sum(axis=1)
    np.testing.assert_allclose(call("nce_rce", "none", alpha=2.0, beta=3.0), 2 * nce + 3 * official_rce(P, ONE_HOT),
                               rtol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 2.0, 5.0])
def test_focal(gamma):
    np.testing.assert_allclose(call("focal", "none", gamma=gamma), (1 - P_Y) ** gamma * CE, rtol=1e-12)


def test_z_loss_adds_the_squared_log_normaliser():
    log_z = np.log(np.exp(LOGITS).sum(axis=1))
    np.testing.assert_allclose(call("z_loss", "none", z_weight=0.01), CE + 0.01 * log_z ** 2, rtol=1e-12)


@pytest.mark.parametrize("name", ["cross_entropy", "ldr_kl", "gce", "sce", "mae", "nce_rce", "focal", "z_loss"])
def test_reductions_and_ignored_rows(name):
    fn = loss(name)
    logits = torch.tensor(LOGITS)
    per_row = fn(logits, torch.tensor(LABELS), reduction="none")
    masked = torch.tensor(LABELS).clone()
    masked[[1, 3]] = -100  # prompt or padding tokens: no loss, and the mean is over the others
    kept = fn(logits, masked, reduction="none")
    assert kept[[1, 3]].tolist() == [0.0, 0.0]
    torch.testing.assert_close(kept[[0, 2, 4]], per_row[[0, 2, 4]])
    torch.testing.assert_close(fn(logits, masked), per_row[[0, 2, 4]].mean())
    torch.testing.assert_close(fn(logits, masked, reduction="sum"), per_row[[0, 2, 4]].sum())


def test_cross_entropy_is_torchs_bit_for_bit():
    """The recipe's default loss: the same numbers as torch.nn.functional.cross_entropy, so runs
    made before the registry reproduce exactly."""
    logits, labels = torch.randn(64, 7), torch.randint(0, 7, (64,))
    labels[::5] = -100
    ours = loss("cross_entropy")(logits, labels, reduction="none")
    assert torch.equal(ours, torch.nn.functional.cross_entropy(logits, labels, reduction="none"))


@pytest.mark.parametrize("name, fields, message", [
    ("hinge", {}, "unknown loss 'hinge'; registered losses: cross_entropy, ldr_kl"),
    ("gce", {"w": 1}, r"unknown field\(s\) \['w'\] for loss 'gce'; it takes: q"),
    ("gce", {"q": 0}, r"loss gce q = 0 must be in \(0, 1\]"),
    ("gce", {"q": "a"}, "loss gce q = 'a' must be a number"),
    ("cross_entropy", {"label_smoothing": 1.5}, r"label_smoothing = 1.5 must be in \[0, 1\]"),
    ("ldr_kl", {"lam": 0.0}, r"loss ldr_kl lam = 0.0 must be in \(0, inf\]"),
    ("ldr_kl", {"softplus": 1}, "loss ldr_kl softplus = 1 must be true or false"),
    ("aldr_kl", {"alpha": 1.0}, r"loss aldr_kl alpha = 1.0 must be in \(1, inf\]"),
    ("focal", {"gamma": float("nan")}, "must be a finite number"),
    ("sce", {"log_zero": 0.0}, r"log_zero = 0.0 must be in \[-inf, 0\)"),
])
def test_bad_fields_are_refused_naming_the_field(name, fields, message):
    with pytest.raises(PeftlabError, match=message):
        loss(name, **fields)


def test_bad_shapes_and_reductions_are_refused():
    fn = loss("gce")
    with pytest.raises(PeftlabError, match="takes logits \\(n, classes\\) and labels \\(n,\\)"):
        fn(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(PeftlabError, match="reduction = 'avg' is unknown"):
        fn(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), reduction="avg")
    with pytest.raises(PeftlabError, match="example_ids must be non-negative integers"):
        loss("aldr_kl")(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), example_ids=torch.tensor([0.0, 1.0]))


def test_the_cli_lists_every_loss_with_its_fields(capsys):
    from peftlab import cli

    assert cli.main(["losses"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows) == losses()
    assert "q=0.7" in rows["gce"] and "lambda0=10, alpha=2" in rows["aldr_kl"] and "Focal loss" in rows["focal"]
