"""HFT and LISA: contract rows, the trainable set re-drawn on schedule over 50 MiniLM-L6 steps with no
optimizer state for frozen parameters and no change to them, what save writes, bad input."""
import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import load_minilm, tiny_bert, tiny_gpt2, tiny_llama, token_batch
from contract import Case, run_contract
from peftlab.model_level import MODEL

WHOLE = "acts on the whole model"  # the peft format has no place for parameters trained in place

ROWS = [
    Case("lisa-bert", lambda: peftlab.LISA(active_blocks=1, interval=3), tiny_bert, token_batch, peft_refusal=WHOLE),
    Case("lisa-llama-named-blocks", lambda: peftlab.LISA(active_blocks=2, blocks="model.layers"), tiny_llama,
         token_batch, peft_refusal=WHOLE),
    Case("hft-bert", lambda: peftlab.HFT(stage_steps=5), tiny_bert, token_batch, peft_refusal=WHOLE),
    Case("hft-llama", lambda: peftlab.config("hft", seed=3), tiny_llama, token_batch, peft_refusal=WHOLE),
    Case("hft-conv1d", lambda: peftlab.HFT(blocks="transformer.h"), tiny_gpt2, token_batch, peft_refusal=WHOLE),
]


@pytest.mark.parametrize("case", ROWS, ids=str)
def test_contract(case, tmp_path):
    run_contract(case, tmp_path)


def _minilm_run(config, steps, check):
    """AdamW (weight decay on) over peftlab.param_groups; after each step and its hook: check(step, model, optimizer)."""
    model, tok = load_minilm()
    batch = dict(tok(["a gripping film", "dull and far too long", "not bad at all"], padding=True,
                     return_tensors="pt"))
    peftlab.attach(model, config)
    optimizer = torch.optim.AdamW(peftlab.param_groups(model, 1e-4), lr=1e-4, weight_decay=0.01)
    model.train()
    for step in range(1, steps + 1):
        # Frozen parameters must not move, weight decay included; checked on the steps around each redraw.
        watched = step % 10 in (0, 1, 2)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if watched and not p.requires_grad}
        optimizer.zero_grad()
        out = model(**batch)
        (out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()).backward()
        optimizer.step()
        params = dict(model.named_parameters())
        moved = [n for n, before in frozen.items() if not torch.equal(params[n], before)]
        assert not moved, f"frozen parameters changed: {moved[:3]}"
        peftlab.step(model, step, optimizer=optimizer)
        check(step, model, optimizer)
    return model


def _state_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p, s in optimizer.state.items() if s}


def test_lisa_redraws_blocks_every_interval_and_drops_their_optimizer_state():
    draws, outside = [], set()

    def check(step, model, optimizer):
        blocks = {int(n.split(".")[2]) for n, p in model.named_parameters() if n.startswith("encoder.layer.")
                  and p.requires_grad}
        assert len(blocks) == 2
        assert blocks == set(peftlab.adapters(model, "default")[MODEL].active.tolist())
        if step % 10 and draws:
            assert blocks == draws[-1], "the trainable set changes only every interval steps"
        if not draws or blocks != draws[-1]:
            draws.append(blocks)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n for n in trainable if not n.startswith("encoder.layer.")} == outside or not outside
        outside.update(n for n in trainable if not n.startswith("encoder.layer."))
        state = _state_names(model, optimizer)
        assert state <= trainable, "no optimizer state for frozen parameters"
        if step % 10:  # mid-stage: every trainable parameter has stepped once, so holds state
            assert state == trainable
            moments = sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k.startswith("exp"))
            assert moments == 2 * sum(p.numel() for n, p in model.named_parameters() if n in trainable)

    model = _minilm_run(peftlab.LISA(active_blocks=2, interval=10), 40, check)
    assert len(draws) >= 3, "blocks re-drawn on schedule"
    assert outside == {n for n, _ in model.named_parameters() if not n.startswith("encoder.layer.")} - {
        n for n, _ in model.named_parameters() if ".adapters." in n}
    assert any(n.startswith("embeddings.") for n in outside) and any(n.startswith("pooler.") for n in outside)


def test_hft_trains_half_of_each_block_and_redraws_per_stage():
    stages = []

    def check(step, model, optimizer):
        trainable = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
        for b in range(6):
            layer = f"encoder.layer.{b}"
            attention = [m for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                                     "attention.output.dense") if f"{layer}.{m}" in trainable]
            ffn = [m for m in ("intermediate.dense", "output.dense") if f"{layer}.{m}" in trainable]
            assert len(attention) == 2 and len(ffn) == 1, (b, attention, ffn)
        assert not any("LayerNorm" in n or n.startswith(("embeddings", "pooler")) for n in trainable)
        if step % 10 and stages:
            assert trainable == stages[-1]
        if not stages or trainable != stages[-1]:
            stages.append(trainable)
        state = _state_names(model, optimizer)
        trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert state <= trainable_names
        if step % 10:
            assert state == trainable_names

    _minilm_run(peftlab.HFT(stage_steps=10), 30, check)
    assert len(stages) >= 3


def test_optimizer_state_shrinks_by_the_frozen_share():
    """After a step, Adam holds two moments for exactly the trainable parameters (those that got a gradient)."""
    for config, share in ((peftlab.LISA(active_blocks=1, interval=10), None), (peftlab.HFT(), 0.5)):
        model = tiny_bert()
        peftlab.attach(model, config)
        optimizer = torch.optim.AdamW(peftlab.param_groups(model, 1e-3), lr=1e-3)
        out = model(**token_batch())
        (out.last_hidden_state.pow(2).mean() + out.pooler_output.pow(2).mean()).backward()
        optimizer.step()
        state = sum(t.numel() for s in optimizer.state.values() for k, t in s.items() if k.startswith("exp"))
        trainable = sum(p.numel() for p in peftlab.trainable_parameters(model).values())
        assert state == 2 * trainable
        if share is not None:  # HFT: half of the block linears' parameters (attention 2 of 4, FFN 1 of 2)
            linears = [m for n, m in model.named_modules() if n.startswith("encoder.") and isinstance(m, torch.nn.Linear)]
            total = sum(p.numel() for m in linears for p in m.parameters())
            assert 0.3 < trainable / total < 0.7
        else:  # LISA: one of two blocks plus the outside
            block = sum(p.numel() for p in model.encoder.layer[0].parameters())
            assert trainable == sum(p.numel() for p in model.parameters()) - block


def test_save_writes_the_parameters_it_trains_and_its_draw(tmp_path):
    model = peftlab.attach(tiny_bert(), peftlab.HFT())
    peftlab.save(model, tmp_path / "a")
    saved = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    linears = {f"{n}.{k}" for n, m in model.named_modules() if n.startswith("encoder.")
               and isinstance(m, torch.nn.Linear) for k, _ in m.named_parameters()}
    assert saved == linears | {"adapters.default.chosen"}


@pytest.mark.parametrize("make, message", [
    (lambda: peftlab.LISA(active_blocks=3), r"active_blocks=3 is more than the 2 blocks of encoder.layer"),
    (lambda: peftlab.LISA(blocks="encoder"), "blocks='encoder' is not a list of blocks"),
    (lambda: peftlab.HFT(blocks="encoder.layer.0.attention.self.dropout"), "is not a list of blocks"),
])
def test_bad_input_is_refused_before_any_change(make, message):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(peftlab.PeftlabError, match=message):
        peftlab.attach(model, make())
    assert "_peftlab" not in model.__dict__ and "adapters" not in model._modules
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("fields, message", [
    (lambda: peftlab.LISA(interval=0), "interval must be a positive integer"),
    (lambda: peftlab.LISA(active_blocks=0), "active_blocks must be a positive integer"),
    (lambda: peftlab.HFT(stage_steps=0), "stage_steps must be a positive integer or None"),
])
def test_bad_fields(fields, message):
    with pytest.raises(peftlab.PeftlabError, match=message):
        fields()
