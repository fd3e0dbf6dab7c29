"""peftlab.analysis (intruder dimensions, spectra, subspace similarity) on matrices whose answer is
known, the searches of bench/probes.py on predicates with a known answer, `peftlab analyze` on a
tiny finished run, and the capacity and intrinsic-dimension searches on a tiny model."""
from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

import peftlab
from peftlab.analysis import (effective_rank, intruder_dimensions, intruder_report, similarity_grid,
                              singular_values, spectrum, stable_rank, subspace_similarity)
from peftlab.bench.probes import largest_true, smallest_true
from run_helpers import tiny_checkpoint, tiny_overrides


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # (n, k)


def _base(out: int = 20, inp: int = 8):
    """W0 = U S V^T with known factors: U (out, m) leaves out - m directions free."""
    basis = _orthonormal(out, out, 0)
    U, free = basis[:, :inp], basis[:, inp:]
    V = _orthonormal(inp, inp, 1)
    S = torch.linspace(10, 1, inp, dtype=torch.float64)
    return U, S, V, free


# ---- intruder dimensions ---------------------------------------------------------------------


def test_rotating_the_top_singular_vector_out_of_the_base_gives_exactly_one_intruder():
    U, S, V, free = _base()
    w0 = U @ torch.diag(S) @ V.T
    angle = math.radians(80)  # |cos| with every base vector: cos 80 deg = 0.17 for u_1, 0 for the rest
    rotated = U.clone()
    rotated[:, 0] = math.cos(angle) * U[:, 0] + math.sin(angle) * free[:, 0]
    w = rotated @ torch.diag(S) @ V.T
    assert intruder_dimensions(w0, w, k=10, threshold=0.5) == 1
    # a small rotation stays recognisable: cos 30 deg = 0.87 >= 0.5
    angle = math.radians(30)
    rotated[:, 0] = math.cos(angle) * U[:, 0] + math.sin(angle) * free[:, 0]
    assert intruder_dimensions(w0, rotated @ torch.diag(S) @ V.T) == 0


def test_a_small_perturbation_gives_no_intruder():
    U, S, V, _ = _base()
    w0 = U @ torch.diag(S) @ V.T
    noise = 1e-3 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert intruder_dimensions(w0, w0 + noise) == 0
    assert intruder_dimensions(w0.float(), w0.float()) == 0


def _reference_count(w0, w, k, threshold):
    """The reference algorithm (reeceshuttle/intruder-dimensions), written out: full-basis SVDs, the
    |dot product| of every tuned vector with every base vector, the max per tuned vector, the top k."""
    U_base = torch.linalg.svd(w0.double(), full_matrices=False)[0]
    U_tuned = torch.linalg.svd(w.double(), full_matrices=False)[0]
    best = torch.abs(torch.einsum("ji,jk->ik", U_tuned, U_base)).max(dim=1).values
    return int((best[:k] < threshold).sum())


@pytest.mark.parametrize("seed, scale, rank", [(0, 3.0, 2), (1, 10.0, 4), (2, 0.5, 8)])
def test_counts_match_the_reference_algorithm_on_low_rank_updates(seed, scale, rank):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(48, 32, generator=g)
    w = w0 + scale * torch.randn(48, rank, generator=g) @ torch.randn(rank, 32, generator=g) / math.sqrt(32)
    for k, threshold in ((10, 0.5), (5, 0.3), (32, 0.7)):
        assert intruder_dimensions(w0, w, k, threshold) == _reference_count(w0, w, k, threshold)
    report = intruder_report({"a": (w0, w), "b": (w0, w0.clone())}, k=10)
    assert report["per_matrix"] == {"a": _reference_count(w0, w, 10, 0.5), "b": 0}
    assert report["total"] == report["per_matrix"]["a"] and len(report["similarity"]["a"]) == 10


def test_intruder_bad_input_is_refused():
    w = torch.zeros(4, 3)
    for call, phrase in ((lambda: intruder_dimensions(w, torch.zeros(3, 4)), "one shape"),
                         (lambda: intruder_dimensions(w, w, k=0), "k must be"),
                         (lambda: intruder_dimensions(w, w, threshold=1.5), "threshold must be in"),
                         (lambda: intruder_report({}), "no weight pairs")):
        with pytest.raises(peftlab.PeftlabError, match=phrase):
            call()


# ---- spectra -----------------------------------------------------------------------------------


def test_effective_rank_is_roy_and_vetterli_entropy_form():
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert effective_rank(torch.outer(torch.ones(5), torch.arange(1.0, 4.0))) == pytest.approx(1.0, abs=1e-6)
    # s = (3, 1): p = (3/4, 1/4), H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    hand = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(hand)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_stable_rank_is_frobenius_over_spectral_squared():
    assert stable_rank(torch.diag(torch.tensor([3.0, 1.0, 1.0]))) == pytest.approx(11 / 9)
    assert stable_rank(torch.eye(6)) == pytest.approx(6.0)
    assert stable_rank(torch.zeros(2, 2)) == 0.0
    facts = spectrum(torch.diag(torch.tensor([2.0, 1.0])))
    assert facts["singular_values"] == pytest.approx([2.0, 1.0]) and facts["frobenius_norm"] == pytest.approx(5 ** 0.5)
    assert singular_values(torch.tensor([[0.0, -4.0], [3.0, 0.0]])).tolist() == pytest.approx([4.0, 3.0])


def test_subspace_similarity_one_for_identical_zero_for_orthogonal():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 12, generator=g, dtype=torch.float64)
    for side in ("right", "left"):
        for i in (1, 2, 4):
            assert subspace_similarity(a, a, i, i, side) == pytest.approx(1.0)
        assert subspace_similarity(a, 3 * a, 2, 4, side) == pytest.approx(1.0)  # top-2 within top-4
    # changes living on disjoint coordinates: orthogonal in both spaces
    left = torch.zeros(6, 6, dtype=torch.float64)
    right = torch.zeros(6, 6, dtype=torch.float64)
    left[0, 0], left[1, 1] = 2.0, 1.0
    right[2, 2], right[3, 3] = 2.0, 1.0
    assert subspace_similarity(left, right, 2, 2) == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(left, right, 2, 2, side="left") == pytest.approx(0.0, abs=1e-12)


def test_subspace_similarity_hand_value_and_grid():
    # A's top right vector e1; B's top right vector (e1 + e2)/sqrt 2: phi(1, 1) = cos^2 45 deg = 1/2
    a = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
    b = torch.zeros(3, 3, dtype=torch.float64)
    b[0] = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2) * 5
    b[1, 2] = 1.0
    assert subspace_similarity(a, b, 1, 1) == pytest.approx(0.5)
    # top-2 of A = span(e1, e2) holds B's top vector: phi(2, 1) = 1
    assert subspace_similarity(a, b, 2, 1) == pytest.approx(1.0)
    grid = similarity_grid(a, b, size=3)
    for i in range(1, 4):
        for j in range(1, 4):
            assert grid[i - 1][j - 1] == pytest.approx(subspace_similarity(a, b, i, j))
    with pytest.raises(peftlab.PeftlabError, match="i, j must be"):
        subspace_similarity(a, b, 0, 1)
    with pytest.raises(peftlab.PeftlabError, match="differ"):
        subspace_similarity(a, torch.zeros(3, 4), 1, 1)


# ---- the searches ------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [8, 37, 100, 4096])
def test_largest_true_finds_the_boundary_exactly(answer):
    found, tried = largest_true(lambda n: n <= answer, 8, 4096)
    assert found == answer
    assert all(ok == (n <= answer) for n, ok in tried.items())
    assert len(tried) <= 2 * math.log2(4096) + 2


def test_largest_true_is_exact_for_every_boundary_in_a_range():
    for answer in range(8, 300):
        assert largest_true(lambda n: n <= answer, 8, 300)[0] == answer, answer


def test_largest_true_edges_and_resolution():
    assert largest_true(lambda n: False, 8, 100)[0] == 0
    found, _ = largest_true(lambda n: n <= 1000, 8, 4096, resolution=0.05)
    assert 950 <= found <= 1000


def test_smallest_true_is_exact_for_every_boundary():
    candidates = list(range(1, 40))
    for answer in candidates:
        assert smallest_true(lambda d: d >= answer, candidates)[0] == answer, answer


@pytest.mark.parametrize("threshold, expected", [(1, 16), (100, 128), (5000, None), (16, 16), (17, 32)])
def test_smallest_true_bisects_sorted_candidates(threshold, expected):
    candidates = [2 ** k for k in range(4, 13)]
    found, tried = smallest_true(lambda d: d >= threshold, candidates[::-1])
    assert found == expected
    assert all(ok == (d >= threshold) for d, ok in tried.items())


# ---- `peftlab analyze RUN_DIR` -----------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """A 6-step LoRA run and a 6-step head-only run of the tiny BERT, trained in this process."""
    from peftlab.recipe import config, trainer

    root = tmp_path_factory.mktemp("analyze")
    model = tiny_checkpoint(root)
    runs = {}
    for name, extra in (("lora", {"method.targets": ["query", "value", "dense"]}),
                        ("head", {"method.name": "head-only"})):
        overrides = tiny_overrides(model, root / name, **extra)
        if name == "head":
            overrides = [o for o in overrides if not o.startswith("method.r=")]
        trainer.train(config.build(None, overrides), echo=lambda *a: None)
        runs[name] = root / name
    return runs


def _cli(*argv):
    from peftlab.cli import main

    return main([str(a) for a in argv])


def test_analyze_cli_writes_json_and_plots_from_the_merged_change(finished_runs, capsys):
    from safetensors.torch import load_file

    run = finished_runs["lora"]
    assert _cli("analyze", run, "--against", run, "--k", 4) == 0
    out = capsys.readouterr().out
    assert "intruder dimensions" in out and "effective rank" in out
    folder = run / "analysis"
    assert {p.name for p in folder.iterdir()} == {"analysis.json", "spectra.png", "intruders.png", "similarity.png"}
    assert all((folder / n).read_bytes()[:4] == b"\x89PNG" for n in ("spectra.png", "intruders.png"))
    report = json.loads((folder / "analysis.json").read_text())
    # the analysed change of each layer is the LoRA's own s B A, read back from the saved adapter
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    layer = "bert.encoder.layer.0.attention.self.query"
    A, B = tensors[f"{layer}.adapters.default.A"], tensors[f"{layer}.adapters.default.B"]
    s = torch.linalg.svdvals((B @ A).double() * (16 / 4))  # alpha 16 / r 4 (the default alpha)
    assert report["spectra"][layer]["singular_values"][:4] == pytest.approx(s[:4].tolist(), rel=1e-3, abs=1e-6)
    assert report["spectra"][layer]["singular_values"][4] == pytest.approx(0.0, abs=1e-5)  # rank <= r
    assert report["intruders"]["k"] == 4 and set(report["intruders"]["per_matrix"]) == set(report["spectra"])
    # a run against itself: identical subspaces
    assert all(grid[i][i] == pytest.approx(1.0, abs=1e-6) for grid in report["similarity"].values() for i in range(4))


def test_analyze_refuses_a_run_without_weight_change_and_stray_options(finished_runs, capsys):
    run = finished_runs["head"]
    assert _cli("analyze", run) == 2
    assert "changed no linear layer" in capsys.readouterr().err
    assert not (run / "analysis").exists()
    assert _cli("analyze", finished_runs["lora"], "--dims", "4,8") == 2
    assert "--dims belongs to `peftlab analyze intrinsic-dim`" in capsys.readouterr().err
    assert _cli("analyze", finished_runs["lora"], "--threshold", "0") == 2
    assert "threshold must be in (0, 1]" in capsys.readouterr().err


# ---- the searches, for real, on the tiny model ---------------------------------------------------


@pytest.mark.slow
def test_capacity_and_intrinsic_dim_searches_run_end_to_end(tmp_path):
    from peftlab.bench.capacity import capacity
    from peftlab.bench.intrinsic_dim import intrinsic_dim

    model = tiny_checkpoint(tmp_path)
    base = [o for o in tiny_overrides(model, tmp_path / "unused", **{"optimizer.lr": 0.05})
            if not o.startswith(("output=", "data.limit=", "method.r="))]
    # one probe per labeling (start = limit): the plumbing, not the curve
    report = capacity([*base, "method.r=4"], tmp_path / "cap", start=4, limit=4, echo=lambda *a: None)
    for labels in ("true", "random"):
        accuracy = report[labels]["train_accuracy"]["4"]
        assert 0 <= accuracy <= 1 and report[labels]["emc"] == (4 if accuracy >= 1.0 else 0)
    assert report["gap"] == report["true"]["emc"] - report["random"]["emc"]
    task = json.loads((tmp_path / "cap" / "random-n00004" / "task.json").read_text())
    assert task["sizes"] == [4, 0, 0] and task["noise"]["rate"] == 0.5  # binary task: rate (K - 1) / K
    assert (tmp_path / "cap" / "capacity.png").is_file()
    found = intrinsic_dim([*base, "data.limit=40"], tmp_path / "id", dims=[8], reference=0.5,
                          echo=lambda *a: None)
    scores = {int(d): s for d, s in found["scores"].items()}
    assert found["target"] == pytest.approx(0.45)
    assert found["d"] == min((d for d, s in scores.items() if s >= 0.45), default=None)
    assert json.loads((tmp_path / "id" / "intrinsic_dim.json").read_text())["d"] == found["d"]
