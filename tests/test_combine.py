"""Combining adapters (peftlab.combine) and the dense `delta` method its exact results attach as.

  * parity with peft's add_weighted_adapter: cat and linear factor for factor, svd by the product
  * the methods on changes equal the weighted (trimmed, dropped) sum of the changes, where peft's
    factor-wise TIES, on A and B separately, does not
  * TIES, magnitude pruning and DARE (fixed seed) on small matrices, computed by hand here
  * the changes of residual (PiSSA) and rescaling (DoRA) methods, save/load/peft export of results
  * bad input refused with the model unchanged; the `peftlab combine` command
"""
import shutil
import zlib

import pytest
import torch
from peft import PeftModel
from peft.utils import merge_utils

import peftlab
from conftest import image_batch, output_of, tiny_bert, tiny_cnn, tiny_gpt2, token_batch
from contract import Case, run_contract

QV = ["query", "value"]
WEIGHTS = {"a": 0.7, "b": -0.3}  # a negative weight: subtracting a task, and peft's sign handling in linear
EXACT = dict(atol=1e-6, rtol=0)

ROWS = [
    Case("delta-linear", lambda: peftlab.Delta(targets=QV), tiny_bert, token_batch),
    Case("delta-conv1d", lambda: peftlab.config("delta", targets=["c_attn", "c_proj"]), tiny_gpt2, token_batch),
    Case("delta-embedding", lambda: peftlab.Delta(targets=["word_embeddings"]), tiny_bert, token_batch),
    Case("delta-conv2d", lambda: peftlab.Delta(targets=["conv1", "conv2"]), tiny_cnn, image_batch),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_delta_contract(case, tmp_path):
    run_contract(case, tmp_path)


def perturbed(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peftlab.trainable_parameters(model).values():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def two_loras(a=dict(r=4, alpha=8), b=dict(r=4, alpha=16)):
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(targets=QV, **a), "a")
    peftlab.attach(model, peftlab.LoRA(targets=QV, **b), "b")
    return perturbed(model)


def changes(model, name):
    return {site: a.delta_weight().detach() for site, a in peftlab.adapters(model, name).items()}


def weighted_sum(model, weights=WEIGHTS):
    per = {n: changes(model, n) for n in weights}
    return {site: sum(w * per[n][site] for n, w in weights.items()) for site in per["a"]}


def peft_combined(model, tmp_path, combination, **options):
    """peft's add_weighted_adapter on the same two adapters (exported to peft's format): site -> (A, B, s)."""
    peftlab.save(model, tmp_path / "peft", format="peft", name=["a", "b"])
    theirs = PeftModel.from_pretrained(tiny_bert(), tmp_path / "peft" / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "peft" / "b", adapter_name="b")
    theirs.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), "ab", combination_type=combination, **options)
    layers = {site: theirs.base_model.model.get_submodule(site) for site in peftlab.adapters(model, "a")}
    return theirs, {s: (l.lora_A["ab"].weight, l.lora_B["ab"].weight, l.scaling["ab"]) for s, l in layers.items()}


# ---- parity with peft ----------------------------------------------------------------------------


@pytest.mark.parametrize("combination, a, b", [("cat", dict(r=4, alpha=8), dict(r=2, alpha=8)),
                                               ("linear", dict(r=4, alpha=8), dict(r=4, alpha=16))])
def test_cat_and_linear_match_peft_factor_for_factor(tmp_path, combination, a, b):
    model = two_loras(a, b)
    theirs, peft_sites = peft_combined(model, tmp_path, combination)
    peftlab.combine(model, WEIGHTS, method=combination, name="ab")
    assert peftlab.adapter_configs(model)["ab"].method == "lora"
    for site, adapter in peftlab.adapters(model, "ab").items():
        A, B, scale = peft_sites[site]
        assert adapter.scale == scale == 1.0
        torch.testing.assert_close(adapter.A, A, **EXACT)
        torch.testing.assert_close(adapter.B, B, **EXACT)
    theirs.set_adapter("ab")
    batch = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(output_of(model, batch), output_of(theirs, batch), atol=1e-5, rtol=0)
    wanted = weighted_sum(model)
    gaps = [(adapter.delta_weight() - wanted[site]).abs().max().item()
            for site, adapter in peftlab.adapters(model, "ab").items()]
    if combination == "cat":  # exact: the ranks add up
        assert max(gaps) < 1e-6
    else:  # linear sums A and B on their own: cross terms B_a A_b, B_b A_a
        assert min(gaps) > 1e-3


@pytest.mark.parametrize("rank", [None, 2])
def test_svd_matches_peft(tmp_path, rank):
    model = two_loras(dict(r=4, alpha=8), dict(r=2, alpha=4))
    _, peft_sites = peft_combined(model, tmp_path, "svd", svd_rank=rank, svd_full_matrices=False)
    peftlab.combine(model, WEIGHTS, method="svd", name="ab", rank=rank)
    for site, adapter in peftlab.adapters(model, "ab").items():
        A, B, scale = peft_sites[site]
        assert adapter.A.shape == A.shape == ((rank or 4), 32)
        # two SVDs of the same matrix: equal to float rounding (observed up to 4e-6 relative)
        torch.testing.assert_close(adapter.delta_weight(), scale * B @ A, atol=1e-6, rtol=1e-5)
    if rank is None:  # rank 4 holds the sum of a rank-4 and a rank-2 change only approximately, rank 6 exactly
        exact = peftlab.combine(model, WEIGHTS, method="svd", name="r6", rank=6)
        wanted = weighted_sum(model)
        for site, adapter in peftlab.adapters(exact, "r6").items():
            torch.testing.assert_close(adapter.delta_weight(), wanted[site], atol=1e-5, rtol=0)


# ---- exact on the changes, where peft's factor-wise methods are not ------------------------------


def test_methods_on_changes_equal_the_weighted_trimmed_sum_where_peft_factorwise_ties_does_not(tmp_path):
    model = two_loras()
    _, peft_ties = peft_combined(model, tmp_path, "ties", density=0.5)
    peftlab.combine(model, WEIGHTS, method="task_arithmetic", name="ta")
    peftlab.combine(model, WEIGHTS, method="ties", name="ties", density=0.5)
    peftlab.combine(model, WEIGHTS, method="magnitude_prune", name="mp", density=0.5)
    assert peftlab.adapter_configs(model)["ties"].method == "delta"
    wanted = weighted_sum(model)
    per = {n: changes(model, n) for n in WEIGHTS}
    weights = torch.tensor(list(WEIGHTS.values()))
    for site in wanted:
        pair = [per["a"][site], per["b"][site]]
        torch.testing.assert_close(changes(model, "ta")[site], wanted[site], **EXACT)
        # peft's element-wise TIES and magnitude pruning, applied to the changes themselves
        reference = merge_utils.ties(pair, weights, 0.5, "total")
        torch.testing.assert_close(changes(model, "ties")[site], reference, **EXACT)
        torch.testing.assert_close(changes(model, "mp")[site], merge_utils.magnitude_prune(pair, weights, 0.5), **EXACT)
        # peft's add_weighted_adapter trims, elects and averages A and B separately: far from it
        A, B, scale = peft_ties[site]
        assert (scale * B @ A - reference).norm() > 0.3 * reference.norm()


def test_dense_result_is_one_adapter_of_every_layer_type_and_merges():
    model = perturbed(peftlab.attach(tiny_gpt2(), peftlab.LoRA(r=2, targets=["c_attn", "wpe"]), "a"))
    peftlab.attach(model, peftlab.LoRA(r=2, targets=["c_attn", "wpe"]), "b")
    perturbed(model, seed=4)
    peftlab.combine(model, WEIGHTS, method="task_arithmetic", name="ab")
    batch = token_batch()
    with torch.no_grad():
        combined = output_of(model, batch)
        peftlab.set_active(model, ["a", "b"])  # the inputs, each scaled by its weight, make the same change
        for name, weight in WEIGHTS.items():
            for adapter in peftlab.adapters(model, name).values():
                adapter.B.mul_(weight)
        torch.testing.assert_close(output_of(model, batch), combined, atol=1e-5, rtol=0)
        peftlab.set_active(model, "ab")
        peftlab.merge(model, "ab")
        torch.testing.assert_close(output_of(model, batch), combined, atol=1e-5, rtol=0)


# ---- by hand on small matrices ------------------------------------------------------------------


def deltas_on_one_layer(matrices, out_features=2, in_features=2):
    """nn.Sequential(Linear) with one delta adapter per given change, named d0, d1, ..."""
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False))
    for i, m in enumerate(matrices):
        peftlab.attach(model, peftlab.Delta(targets=["0"]), f"d{i}")
        with torch.no_grad():
            peftlab.adapters(model, f"d{i}")["0"].delta.copy_(torch.tensor(m))
    return model


HAND = [[[3.0, -1.0], [0.5, 2.0]], [[-2.0, -4.0], [1.0, -0.1]], [[1.0, 0.2], [0.3, 5.0]]]
HAND_WEIGHTS = {"d0": 1.0, "d1": 0.5, "d2": 2.0}


def test_ties_by_hand():
    # density 0.5 keeps 2 of 4 entries: d0 -> [[3, 0], [0, 2]], d1 -> [[-2, -4], [0, 0]], d2 -> [[1, 0], [0, 5]]
    # elected signs (of the sum [[2, -4], [0, 7]]): [[+, -], [+, +]]
    # (0,0): d0 3 and d2 1 agree -> (1*3 + 2*1) / 2 = 2.5;  (0,1): d1 alone -> 0.5*-4 = -2
    # (1,0): nothing kept -> 0;  (1,1): d0 2 and d2 5 -> (1*2 + 2*5) / 2 = 6
    model = peftlab.combine(deltas_on_one_layer(HAND), HAND_WEIGHTS, method="ties", name="t", density=0.5)
    torch.testing.assert_close(peftlab.adapters(model, "t")["0"].delta, torch.tensor([[2.5, -2.0], [0.0, 6.0]]))


def test_magnitude_prune_by_hand():
    # the trimmed changes above, summed with weights 1, 0.5, 2: [[3 - 1 + 2, -2], [0, 2 + 10]]
    model = peftlab.combine(deltas_on_one_layer(HAND), HAND_WEIGHTS, method="magnitude_prune", name="m", density=0.5)
    torch.testing.assert_close(peftlab.adapters(model, "m")["0"].delta, torch.tensor([[4.0, -2.0], [0.0, 12.0]]))


def dare_masks(seed, shape, density):
    """The documented draw: one CPU generator seeded with seed + crc32(site name), uniform < density."""
    g = torch.Generator().manual_seed(seed + zlib.crc32(b"0"))
    return torch.rand(shape, generator=g) < density


def test_dare_by_hand_with_a_fixed_seed():
    g = torch.Generator().manual_seed(0)
    d0, d1 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    weights = {"d0": 0.6, "d1": 0.9}
    keep = dare_masks(5, (2, 3, 4), 0.4)
    dropped = [d0 * keep[0] / 0.4, d1 * keep[1] / 0.4]
    linear_expected = 0.6 * dropped[0] + 0.9 * dropped[1]
    ties_expected = torch.zeros(3, 4)
    for i in range(3):
        for j in range(4):
            values = [dropped[0][i, j].item(), dropped[1][i, j].item()]
            sign = 1.0 if sum(values) >= 0 else -1.0
            agreeing = [w * v for w, v in zip(weights.values(), values) if v != 0 and (v > 0) == (sign > 0)]
            ties_expected[i, j] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    model = deltas_on_one_layer([d0.tolist(), d1.tolist()], 3, 4)
    peftlab.combine(model, weights, method="dare_linear", name="dl", density=0.4, seed=5)
    peftlab.combine(model, weights, method="dare_ties", name="dt", density=0.4, seed=5)
    peftlab.combine(model, weights, method="dare_linear", name="again", density=0.4, seed=5)
    peftlab.combine(model, weights, method="dare_linear", name="other", density=0.4, seed=6)
    result = {n: peftlab.adapters(model, n)["0"].delta for n in ("dl", "dt", "again", "other")}
    torch.testing.assert_close(result["dl"], linear_expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(result["dt"], ties_expected, atol=1e-6, rtol=0)
    assert torch.equal(result["again"], result["dl"]) and not torch.equal(result["other"], result["dl"])


def test_dare_keeps_a_density_share_and_rescales():
    change = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    model = deltas_on_one_layer([change.tolist()], 64, 64)
    peftlab.combine(model, {"d0": 1.0}, method="dare_linear", name="dl", density=0.3)
    result = peftlab.adapters(model, "dl")["0"].delta
    kept = result != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.03
    torch.testing.assert_close(result[kept], change[kept] / 0.3)


def test_svd_variants_truncate_the_trimmed_change():
    g = torch.Generator().manual_seed(2)
    model = deltas_on_one_layer([torch.randn(6, 5, generator=g).tolist() for _ in range(2)], 6, 5)
    weights = {"d0": 1.0, "d1": 0.5}
    peftlab.combine(model, weights, method="ties", name="dense", density=0.6)
    peftlab.combine(model, weights, method="ties_svd", name="low", density=0.6, rank=2)
    dense = peftlab.adapters(model, "dense")["0"].delta
    U, S, Vh = torch.linalg.svd(dense)
    best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]  # Eckart-Young: the closest rank-2 matrix
    torch.testing.assert_close(peftlab.adapters(model, "low")["0"].delta_weight(), best, atol=1e-5, rtol=0)


# ---- weight forms of other methods; files --------------------------------------------------------


@pytest.mark.parametrize("config", [peftlab.LoRA(r=4, init="pissa", targets=QV), peftlab.DoRA(r=4, targets=QV),
                                    peftlab.VeRA(r=4, targets=QV)], ids=["pissa", "dora", "vera"])
def test_a_combined_change_computes_what_its_input_computes(config):
    """PiSSA's change is s (B A - B0 A0) of the original weight (the host holds W0 - s B0 A0), DoRA's a
    rescaling: combined at weight 1 alone, each computes what the input computes."""
    model = perturbed(peftlab.attach(tiny_bert(), config, "x"))
    batch = token_batch()
    with torch.no_grad():
        expected = output_of(model, batch)
        peftlab.combine(model, {"x": 1.0}, method="task_arithmetic", name="c")
        assert model._peftlab.active == ["c"]
        torch.testing.assert_close(output_of(model, batch), expected, atol=1e-5, rtol=0)


def test_results_save_load_and_export_like_any_adapter(tmp_path):
    model = two_loras(dict(r=4, alpha=8, overrides={"value": {"r": 2}}), dict(r=2, alpha=8))
    peftlab.combine(model, WEIGHTS, method="cat", name="cat")  # rank 6 on query, 4 on value
    peftlab.combine(model, WEIGHTS, method="ties", name="ties", density=0.5)
    ranks = {s.rsplit(".", 1)[1]: a.A.shape[0] for s, a in peftlab.adapters(model, "cat").items()}
    assert ranks == {"query": 6, "value": 4}
    batch = token_batch()
    for name in ("cat", "ties"):
        peftlab.set_active(model, name)
        with torch.no_grad():
            expected = output_of(model, batch)
        peftlab.save(model, tmp_path / name, name=name)
        peftlab.save(model, tmp_path / f"{name}-peft", name=name, format="peft")
        for directory in (tmp_path / name, tmp_path / f"{name}-peft" / name):
            fresh = peftlab.load(tiny_bert(), directory)
            with torch.no_grad():
                torch.testing.assert_close(output_of(fresh, batch), expected, atol=1e-5, rtol=0)
        theirs = PeftModel.from_pretrained(tiny_bert(), tmp_path / f"{name}-peft" / name)
        with torch.no_grad():
            torch.testing.assert_close(output_of(theirs, batch), expected, atol=1e-5, rtol=0)


# ---- bad input -----------------------------------------------------------------------------------


def _with_houlsby():
    model = two_loras()
    peftlab.attach(model, peftlab.config("houlsby"), "h")
    return model


def _other_sites():
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=4, targets=QV), "a")
    peftlab.attach(model, peftlab.LoRA(r=4, targets=["query"]), "b")
    return model


def _with_dora():
    model = tiny_bert()
    peftlab.attach(model, peftlab.LoRA(r=4, targets=QV), "a")
    peftlab.attach(model, peftlab.DoRA(r=4, targets=QV), "b")
    return model


BAD = [
    ("different sites", _other_sites, dict(weights=WEIGHTS), "change different layers"),
    ("no weight form", _with_houlsby, dict(weights={"a": 0.5, "h": 0.5}), "no weight form"),
    ("unknown name", two_loras, dict(weights={"a": 0.5, "c": 0.5}), "no adapter named 'c'"),
    ("no names", two_loras, dict(weights={}), "mapping of attached adapter names"),
    ("weight not a number", two_loras, dict(weights={"a": "x", "b": 0.5}), "must be a finite number"),
    ("density 0", two_loras, dict(weights=WEIGHTS, method="ties", density=0.0), "density in (0, 1]"),
    ("density above 1", two_loras, dict(weights=WEIGHTS, method="dare_linear", density=1.5), "density in (0, 1]"),
    ("density missing", two_loras, dict(weights=WEIGHTS, method="ties"), "density in (0, 1]"),
    ("density unused", two_loras, dict(weights=WEIGHTS, method="cat", density=0.5), "keeps every entry"),
    ("unknown method", two_loras, dict(weights=WEIGHTS, method="average"), "choose one of"),
    ("rank too large", two_loras, dict(weights=WEIGHTS, method="svd", rank=40), "rank <= 32"),
    ("cat of dora", _with_dora, dict(weights=WEIGHTS, method="cat"), "has none at"),
    ("linear of two ranks", lambda: two_loras(b=dict(r=2, alpha=4)), dict(weights=WEIGHTS, method="linear"),
     "use cat or svd"),
    ("name taken", two_loras, dict(weights=WEIGHTS, name="a"), "needs a new name"),
]


@pytest.mark.parametrize("make, options, phrase", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_refused_before_anything_is_attached(make, options, phrase):
    model = make()
    keys, active = set(model.state_dict()), list(model._peftlab.active)
    configs = dict(peftlab.adapter_configs(model))
    options = dict(options)
    with pytest.raises(peftlab.PeftlabError, match=phrase.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        peftlab.combine(model, options.pop("weights"), **{"name": "new", **options})
    assert set(model.state_dict()) == keys and model._peftlab.active == active
    assert peftlab.adapter_configs(model) == configs


# ---- the command ---------------------------------------------------------------------------------


def test_combine_command_writes_one_adapter_and_refuses_bad_runs(tmp_path, capsys):
    from fault_helpers import snapshot, train_args
    from run_helpers import tiny_checkpoint

    from peftlab.cli import main
    from peftlab.recipe import models, runs

    checkpoint = tiny_checkpoint(tmp_path)
    first = tmp_path / "a"
    assert main(train_args(checkpoint, first)) == 0
    second = tmp_path / "b"
    shutil.copytree(first, second)  # the same adapter twice: 0.5 + 0.5 of it is the adapter itself
    # in process: a fresh interpreter costs more than the command
    assert main(["combine", str(first), str(second), "--method", "task_arithmetic", "--weights", "0.5,0.5",
                 "--out", str(tmp_path / "ab")]) == 0
    trained, _, _, task = runs.load_trained(first)
    base, _ = models.load(str(checkpoint), task["kind"], task["label_names"])
    peftlab.load(base, tmp_path / "ab")
    assert peftlab.adapter_configs(base)["default"].method == "delta"
    for site, adapter in peftlab.adapters(trained, "default").items():
        torch.testing.assert_close(peftlab.adapters(base, "default")[site].delta, adapter.delta_weight(), **EXACT)

    # the refusals, in process (the command's own parsing aside, the same code): nothing written
    with pytest.raises(peftlab.PeftlabError, match=r"--weights has 3 value\(s\) for 2 run\(s\)"):
        runs.combine_runs([first, second], tmp_path / "x", "ties", [0.5, 0.3, 0.2])
    with pytest.raises(peftlab.PeftlabError, match=r"density in \(0, 1\]"):
        runs.combine_runs([first, second], tmp_path / "x", "ties", [1.0, 1.0], density=2.0)
    config = second / "config.yaml"
    config.write_text(config.read_text().replace(str(checkpoint), "minilm-l6"))
    with pytest.raises(peftlab.PeftlabError, match="combine runs of one base model"):
        runs.combine_runs([first, second], tmp_path / "x", "cat", [1.0, 1.0])
    assert main(["combine", str(first), str(first), "--method", "cat", "--weights", "1,x",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--weights '1,x' must be numbers" in capsys.readouterr().err
    assert snapshot(tmp_path / "x") == {}
