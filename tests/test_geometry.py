"""Site geometry (in/out features, the (out, in) views, the rank check) and the shared top-r SVD."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftlab import PeftlabError
from peftlab.hosts import host_kind
from peftlab.linalg import top_r_svd
from peftlab.registry import Site

HOSTS = {
    "linear": lambda: nn.Linear(6, 4),
    "conv1d": lambda: Conv1D(4, 6),  # nf=4 outputs, nx=6 inputs
    "embedding": lambda: nn.Embedding(6, 4),  # matrix (dim, num): "in" is the index
    "conv2d": lambda: nn.Conv2d(2, 4, (1, 3)),  # in = cin * kh * kw = 6
}


@pytest.mark.parametrize("kind", HOSTS)
def test_site_geometry_is_the_matrix_view(kind):
    torch.manual_seed(0)
    host = HOSTS[kind]()
    site = Site("layer", host, host_kind(host))
    assert site.weight.shape == (site.out_features, site.in_features) == (4, 6)
    assert site.max_rank == 4
    assert torch.equal(site.as_matrix(host.weight.detach()), site.weight.detach())


def test_check_rank_names_site_limit_and_fix():
    site = Site("encoder.query", nn.Linear(32, 16), host_kind(nn.Linear(32, 16)))
    site.check_rank(16)
    with pytest.raises(PeftlabError, match=r"^rank r=17 is larger than encoder.query allows \(16 x 32\): "
                                           r"use r <= 16, or an override for this site$"):
        site.check_rank(17)
    with pytest.raises(PeftlabError, match=r"^SoRA rank r=20 .*use r <= 16"):
        site.check_rank(20, "SoRA")
    with pytest.raises(PeftlabError, match=r"^init_r=20 is larger .*use init_r <= 16, or an override"):
        site.check_rank(20, field="init_r")
    with pytest.raises(PeftlabError, match=r"use max_rank <= 16, or a smaller target_rank$"):
        site.check_rank(20, "IncreLoRA", field="max_rank", fix="or a smaller target_rank")


def test_top_r_svd_exact_is_the_truncated_svd():
    torch.manual_seed(0)
    M = torch.randn(7, 5)
    U, S, Vh = top_r_svd(M, 3)
    full_U, full_S, full_Vh = torch.linalg.svd(M, full_matrices=False)
    assert (U.shape, S.shape, Vh.shape) == ((7, 3), (3,), (3, 5))
    assert torch.equal(U, full_U[:, :3]) and torch.equal(S, full_S[:3]) and torch.equal(Vh, full_Vh[:3])


def test_top_r_svd_randomised_matches_svd_lowrank():
    M = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    U, S, Vh = top_r_svd(M, 3, niter=2)
    torch.manual_seed(1)
    ref_U, ref_S, ref_V = torch.svd_lowrank(M, 3, niter=2)
    assert torch.equal(U, ref_U) and torch.equal(S, ref_S) and torch.equal(Vh, ref_V.T)
    assert Vh.shape == (3, 5)
