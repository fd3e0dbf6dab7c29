"""CorDA: contract rows (both modes), the decomposition's properties, and parity with `peft`.

Parity: the same calibration sequences (one per forward, as `peft`/the official code expect)
give the same covariance, the same damped inverse and the same SVD; measured bitwise equal on
MiniLM-L6; asserted: A, B, W_res within atol 1e-6 and outputs (after setting B to the same
random values in both) within 1e-5.
"""
import random

import pytest
import torch

import peftlab
from conftest import output_of, tiny_bert, tiny_gpt2, token_batch
from contract import Case, run_contract
from peftlab.hosts import host_kind
from peftlab.methods.corda import damped_inverse
from peftlab.registry import Site


def calibration(n=5, length=12):
    return [token_batch(seed=20 + i, batch=1, length=length) for i in range(n)]


ROWS = [
    Case("corda-ipm-linear", lambda: peftlab.CorDA(r=4, targets=["query", "value"]), tiny_bert, token_batch,
         calibration),
    Case("corda-kpm-conv1d", lambda: peftlab.config("corda", r=4, mode="kpm", targets=["c_attn", "c_fc"]),
         tiny_gpt2, token_batch, calibration),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_adapter_holds_the_chosen_components_of_the_covariance_weighted_svd(mode):
    model = tiny_bert()
    W0 = model.encoder.layer[0].attention.self.query.weight.detach().clone()
    cfg = peftlab.config("corda", r=3, alpha=6, mode=mode, targets=["encoder.layer.0.attention.self.query"])
    assert type(cfg) is peftlab.CorDA
    host = model.encoder.layer[0].attention.self.query
    stats = cfg.calibrate(model, [Site("encoder.layer.0.attention.self.query", host, host_kind(host))], calibration())
    peftlab.attach(model, cfg, calibration=calibration())
    adapter = next(iter(peftlab.adapters(model, "default").values()))
    # W0 C = U S V^T  ->  s * B A = U_k S_k V_k^T C^-1, the top (ipm) or bottom (kpm) k components
    damped, inverse = damped_inverse(next(iter(stats.values())))
    U, S, Vh = torch.linalg.svd(W0.double() @ damped.double())
    keep = slice(0, 3) if mode == "ipm" else slice(29, 32)
    expected = U[:, keep] @ torch.diag(S[keep]) @ Vh[keep] @ inverse.double()
    torch.testing.assert_close(adapter.delta_weight().double(), expected, atol=1e-4, rtol=1e-4)
    # the host holds W0 minus exactly that while attached
    torch.testing.assert_close(model.encoder.layer[0].attention.self.query.weight + adapter.delta_weight(), W0,
                               atol=1e-5, rtol=0)


def test_covariance_is_per_sequence_whatever_the_batching():
    # The official statistic: each sequence scaled by its own max, averaged over sequences. A padded
    # batch of 4 must give what 4 unpadded forwards give (a per-batch mean would be 4x larger, and
    # scaled by the batch's max instead of each sequence's).
    model = tiny_bert().eval()
    host = model.encoder.layer[1].attention.self.value
    site = Site("encoder.layer.1.attention.self.value", host, host_kind(host))
    batch = token_batch(seed=7, batch=4, length=12)
    batch["attention_mask"] = torch.ones(4, 12, dtype=torch.long)
    batch["attention_mask"][1, 9:] = 0
    batch["attention_mask"][3, 5:] = 0
    rows = [{k: v[i:i + 1, :int(batch["attention_mask"][i].sum())] for k, v in batch.items()} for i in range(4)]
    padded = peftlab.CorDA(targets=["value"]).calibrate(model, [site], [batch])[site.name]
    single = peftlab.CorDA(targets=["value"]).calibrate(model, [site], rows)[site.name]
    torch.testing.assert_close(padded, single, atol=1e-6, rtol=1e-5)
    # and by hand, for the first sequence's share
    seen = []
    handle = host.register_forward_hook(lambda m, args, out: seen.append(args[0][0]))
    with torch.no_grad():
        model(**rows[0])
    handle.remove()
    x = seen[0] / seen[0].max().abs()
    others = peftlab.CorDA(targets=["value"]).calibrate(model, [site], rows[1:])[site.name]
    torch.testing.assert_close(padded, (x.T @ x + 3 * others) / 4, atol=1e-6, rtol=1e-5)


def test_bad_mode_and_missing_calibration():
    with pytest.raises(peftlab.PeftlabError, match="ipm"):
        peftlab.CorDA(mode="top")
    with pytest.raises(peftlab.PeftlabError, match="calibration"):
        peftlab.attach(tiny_bert(), peftlab.CorDA(targets=["query"]))
    with pytest.raises(peftlab.PeftlabError, match="no calibration batches"):
        peftlab.attach(tiny_bert(), peftlab.CorDA(targets=["query"]), calibration=[])
    # a site the forward never reaches gets no covariance: named, instead of a division by zero
    model, stray = tiny_bert(), torch.nn.Linear(32, 32)
    query = model.encoder.layer[0].attention.self.query
    sites = [Site("encoder.layer.0.attention.self.query", query, host_kind(query)),
             Site("stray", stray, host_kind(stray))]
    with pytest.raises(peftlab.PeftlabError, match="stray saw no input"):
        peftlab.CorDA(targets=["query"]).calibrate(model, sites, calibration())


# ---- parity with peft ----------------------------------------------------------------------------

TEXTS = ["a gripping, beautifully shot film", "dull and far too long", "not bad at all, honestly",
         "the actors seem bored and so was I", "a small miracle of a movie", "too clever by half, and twice as long",
         "funny, warm and surprisingly wise", "an utter mess from start to finish",
         "I laughed, I cried, I bought popcorn again", "the plot holes could swallow a truck",
         "quietly devastating and beautifully acted", "a sequel nobody asked for",
         "sharp writing and a terrific cast", "it drags, then it stops", "the best thing about it is the soundtrack",
         "a thriller without a single thrill"]


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_parity_with_peft_on_minilm(mode, minilm, minilm_batch):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    from conftest import load_minilm

    model, tok = minilm
    rng = random.Random(0)  # 12 sequences of ~35 tokens: more tokens than inputs (384), C has full rank
    batches = [dict(tok([" ".join(rng.sample(TEXTS, 5))], return_tensors="pt")) for _ in range(12)]
    targets = ["query", "value"]
    peftlab.attach(model, peftlab.CorDA(r=4, alpha=8, mode=mode, targets=targets), calibration=batches)

    reference = load_minilm()[0]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                        corda_config=CordaConfig(corda_method=mode))
    preprocess_corda(reference, config, run_model=lambda: [reference(**b) for b in batches])
    theirs = get_peft_model(reference, config).eval()

    g = torch.Generator().manual_seed(0)
    for site, adapter in peftlab.adapters(model, "default").items():
        layer = theirs.base_model.model.get_submodule(site)
        torch.testing.assert_close(adapter.A, layer.lora_A["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(adapter.B, layer.lora_B["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(model.get_submodule(site).weight, layer.base_layer.weight, atol=1e-6, rtol=0)
        with torch.no_grad():
            b = adapter.B + 0.05 * torch.randn(adapter.B.shape, generator=g)
            adapter.B.copy_(b)
            layer.lora_B["default"].weight.copy_(b)
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, minilm_batch), output_of(theirs, minilm_batch),
                                   atol=1e-5, rtol=1e-5)
