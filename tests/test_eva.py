"""EVA: contract rows, the rank redistribution, save/load of the ranks, and parity with `peft`.

Parity (same calibration batches -> same adapter): `peft`'s EVA and this one run the same
incremental PCA with the same seeded randomised SVD, the same convergence loop and the same
tie-breaking in the rank redistribution, so ranks are equal and A agrees to float rounding
(measured: bitwise equal on MiniLM-L6; asserted atol 1e-6). Outputs: B is set to the same random
values in both models, and their outputs agree to 1e-5.
"""
import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract

QKV = ["query", "key", "value"]


def calibration(n=4, batch=4, length=10):
    return [token_batch(seed=10 + i, batch=batch, length=length) for i in range(n)]


ROWS = [
    Case("eva-linear-shared-inputs", lambda: peftlab.EVA(r=4, targets=QKV + ["attention.output.dense"]),
         tiny_bert, token_batch, calibration),
    Case("eva-conv1d-whiten", lambda: peftlab.config("eva", r=2, rho=1.5, whiten=True, targets=["c_attn", "c_fc"]),
         tiny_gpt2, token_batch, calibration),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def test_registry_name_builds_eva_and_round_trips_ranks():
    cfg = peftlab.config("eva", r=4, rho=1.5, targets=QKV)
    assert type(cfg) is peftlab.EVA and cfg.method == "eva"
    model = tiny_bert()
    peftlab.attach(model, cfg, calibration=calibration())
    cfg = peftlab.adapter_configs(model)["default"]  # the attached config holds the ranks calibration chose
    again = peftlab.from_json(cfg.to_json())
    assert again == cfg and again.ranks == cfg.ranks and len(cfg.ranks) == 6


def test_ranks_are_redistributed_within_the_budget():
    model = tiny_bert()
    targets = ["query", "attention.output.dense", "intermediate.dense"]
    cfg = peftlab.EVA(r=4, rho=2.0, targets=targets, overrides={"intermediate.dense": {"r": 2}})
    peftlab.attach(model, cfg, calibration=calibration())
    ranks = peftlab.adapter_configs(model)["default"].ranks
    budget = {n: 2 if n.endswith("intermediate.dense") else 4 for n in ranks}
    assert sum(ranks.values()) == sum(budget.values())  # the total is kept
    assert all(0 <= k <= round(2.0 * budget[n]) for n, k in ranks.items())  # rho caps each site
    assert len(set(ranks.values())) > 1  # ...and the ranks did move
    for site, adapter in peftlab.adapters(model, "default").items():
        assert adapter.A.shape == (ranks[site], 32) and torch.all(adapter.B == 0)
        assert adapter.scale == cfg.alpha / budget[site]  # adjust_scaling_factors: s = alpha / r
        rows = adapter.A.double() @ adapter.A.double().T  # principal directions: orthonormal rows
        torch.testing.assert_close(rows, torch.eye(ranks[site], dtype=torch.float64), atol=1e-5, rtol=0)


def test_loading_needs_the_ranks_and_calibration_needs_batches():
    with pytest.raises(peftlab.PeftlabError, match="calibration"):
        peftlab.attach(tiny_bert(), peftlab.EVA(r=2, targets=QKV))
    with pytest.raises(peftlab.PeftlabError, match="no rank for"):
        peftlab.attach(tiny_bert(), peftlab.EVA(r=2, targets=QKV), state_dict={})
    with pytest.raises(peftlab.PeftlabError, match="did not converge"):
        peftlab.attach(tiny_bert(), peftlab.EVA(r=2, tau=1.0, max_batches=3, targets=QKV), calibration=calibration())
    with pytest.raises(peftlab.PeftlabError, match="rho"):
        peftlab.EVA(rho=0.5)


def test_label_mask_drops_ignored_tokens():
    cfg = peftlab.EVA()
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
             "labels": torch.tensor([[-100, 5, 5], [5, 5, -100]])}
    assert cfg._mask(batch).tolist() == [[False, True, False], [True, True, False]]
    assert peftlab.EVA(use_label_mask=False)._mask(batch).tolist() == [[True, True, False], [True, True, True]]


# ---- parity with peft ----------------------------------------------------------------------------


def _peft_eva(model, batches, targets, **eva):
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    lora = {k: eva.pop(k) for k in ("r", "lora_alpha")}
    config = LoraConfig(target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(**eva), **lora)
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(peft_model, batches, show_progress_bar=False)
    return peft_model.eval()  # peft's EVA leaves the model in its wrapper's (training) mode


def _compare(ours, theirs, batch, atol=1e-6):
    cfg = peftlab.adapter_configs(ours)["default"]
    g = torch.Generator().manual_seed(0)
    for site, adapter in peftlab.adapters(ours, "default").items():
        layer = theirs.base_model.model.get_submodule(site)
        if cfg.ranks[site] == 0:  # peft drops a layer given rank 0
            assert not hasattr(layer, "lora_A")
            continue
        torch.testing.assert_close(adapter.A, layer.lora_A["default"].weight, atol=atol, rtol=0)
        assert adapter.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        with torch.no_grad():  # the same B in both, so the outputs test scale and A together
            b = 0.1 * torch.randn(adapter.B.shape, generator=g)
            adapter.B.copy_(b)
            layer.lora_B["default"].weight.copy_(b)
    with torch.no_grad():
        torch.testing.assert_close(output_of(ours, batch), output_of(theirs, batch), atol=1e-5, rtol=1e-5)


TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "not bad at all, honestly",
         "the actors seem bored and so was I", "a small miracle of a movie", "too clever by half, and twice as long",
         "funny, warm and surprisingly wise", "an utter mess from start to finish",
         "I laughed, I cried, I bought popcorn again", "the plot holes could swallow a truck",
         "quietly devastating and beautifully acted", "a sequel nobody asked for",
         "sharp writing and a terrific cast", "it drags, then it stops", "the best thing about it is the soundtrack",
         "a thriller without a single thrill"]


def test_parity_with_peft_on_minilm(minilm, minilm_batch):
    from conftest import load_minilm

    model, tok = minilm
    batches = [dict(tok(TEXTS[i:i + 4], padding=True, return_tensors="pt")) for i in range(0, 16, 4)]
    targets = ["query", "key", "value", "attention.output.dense"]
    cfg = peftlab.EVA(r=4, alpha=8, rho=2.0, targets=targets)
    peftlab.attach(model, cfg, calibration=batches)
    cfg = peftlab.adapter_configs(model)["default"]
    theirs = _peft_eva(load_minilm()[0], batches, targets, r=4, lora_alpha=8, rho=2.0)
    expected = {s: k for s, k in theirs.peft_config["default"].rank_pattern.items()}
    assert {s: k for s, k in cfg.ranks.items() if k != 4} == {s: k for s, k in expected.items() if k != 4}
    assert len(set(cfg.ranks.values())) > 2  # a real redistribution, q/k/v sharing one PCA
    _compare(model, theirs, minilm_batch)


@pytest.mark.parametrize("options", [dict(whiten=True), dict(adjust_scaling_factors=False, rho=1.5)], ids=str)
def test_parity_with_peft_on_tiny_gpt2_with_label_mask(options):
    batches = calibration(n=3, length=12)
    for i, b in enumerate(batches):
        b["labels"] = b["input_ids"].clone()
        b["labels"][:, : 2 + i] = -100  # a prompt whose tokens carry no loss: left out of the PCA
    targets = ["c_attn", "c_fc"]
    ours = tiny_gpt2()
    cfg = peftlab.EVA(r=3, alpha=6, targets=targets, **options)
    peftlab.attach(ours, cfg, calibration=batches)
    theirs = _peft_eva(tiny_gpt2(), batches, targets, r=3, lora_alpha=6, **options)
    _compare(ours, theirs, token_batch(), atol=1e-6)


class Funnel(torch.nn.Module):
    """wide (64 isotropic inputs) -> narrow (all its input variance in 4 directions)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wide = torch.nn.Linear(64, 4)
        self.narrow = torch.nn.Linear(4, 8)

    def forward(self, x):
        return self.narrow(self.wide(x))


def test_a_site_given_rank_zero_keeps_an_empty_adapter_through_save_and_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(16, 64, generator=g)} for _ in range(4)]
    model = Funnel()
    cfg = peftlab.EVA(r=2, rho=2.0, targets=["wide", "narrow"])
    peftlab.attach(model, cfg, calibration=batches)
    cfg = peftlab.adapter_configs(model)["default"]
    assert cfg.ranks == {"wide": 0, "narrow": 4}  # narrow's 4 directions explain more than any of wide's
    assert peftlab.adapters(model, "default")["wide"].A.shape == (0, 64)
    with torch.no_grad():
        peftlab.adapters(model, "default")["narrow"].B.normal_()
        out = model(batches[0]["x"])
    peftlab.save(model, tmp_path / "eva")
    fresh = Funnel()
    peftlab.load(fresh, tmp_path / "eva")
    with torch.no_grad():
        torch.testing.assert_close(fresh(batches[0]["x"]), out, atol=1e-6, rtol=0)
    assert peftlab.adapter_configs(fresh)["default"].ranks == cfg.ranks
