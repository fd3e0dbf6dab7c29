"""Host layers seen as matrices.

Every weight method in peftlab thinks of the frozen weight as a matrix W0 of shape
(out, in) and of its input as something the layer multiplies by W0. The layer types differ
only in how that matrix is stored and applied:

    nn.Linear     weight (out, in)            y = x @ W.T + b
    Conv1D (HF)   weight (in, out)            y = x @ W + b            (GPT-2's fan-in/fan-out layout)
    nn.Embedding  weight (num, dim)           y = W[idx]    -> matrix (dim, num), "in" = one-hot idx
    nn.Conv2d     weight (out, cin, kh, kw)   y = conv(x, W) -> matrix (out, cin*kh*kw)

A `HostKind` hides these differences behind six operations, so one LoRA class serves all
four layer types, and a new method gets conv and embedding support for free:

    matrix(host)            -> W0 as (out, in)
    write(host, M)          writes an (out, in) matrix back into the layer's own layout
    apply_in(host, x, A)    the layer's own operation with an (r, in) weight: x -> (..., r) or (N, r, H, W)
    apply_out(host, h, B)   a pointwise (out, r) map over the channel dimension of h
    add_out(host, y, h, B)  y + apply_out(host, h, B), fused into one GEMM where the layout allows;
                            y must be base(x)'s fresh output (it may be added to in place)
    forward_with(host, x, M) the layer's forward with weight matrix M (and the layer's bias)

A layer whose frozen weight is held quantized (peftlab.quantize: bitsandbytes' NF4 and int8
linears) is a `linear` kind with `quantized=True`: `matrix` dequantizes to an fp32 (out, in)
copy, `write` requantizes, and `snapshot`/`restore` keep and put back the packed weight
itself, so undoing a merge is exact. Such kinds are registered by the module that defines them
(`register_kinds`), looked up only once a layer of that library is seen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # transformers is a dependency, but keep the core importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = None


@dataclass(frozen=True)
class HostKind:
    name: str
    in_features: Callable[[nn.Module], int]
    out_features: Callable[[nn.Module], int]
    matrix: Callable[[nn.Module], Tensor]
    write: Callable[[nn.Module, Tensor], None]
    apply_in: Callable[[nn.Module, Tensor, Tensor], Tensor]
    apply_out: Callable[[nn.Module, Tensor, Tensor], Tensor]
    forward_with: Callable[[nn.Module, Tensor, Tensor], Tensor]
    add_out: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]
    # Inputs are token indices (Embedding): dropout on the input means nothing there.
    index_input: bool = False
    # The weight is held quantized: matrix() is a dequantized copy, write() requantizes (lossy).
    quantized: bool = False
    # Exact undo of a write: snapshot(host) -> what restore(host, saved) puts back. None: a copy
    # of matrix(host), restored with write() (exact for full-precision layers).
    snapshot: Callable[[nn.Module], Any] | None = None
    restore: Callable[[nn.Module, Any], None] | None = None
    # matrix(host) is the host's own (out, in) weight parameter and its forward is x @ W.T + b, so
    # attach may keep W and an adapter's (k, in) rows in one (out + k, in) buffer and the two share one
    # GEMM (peftlab.core: the stacked path). nn.Linear only.
    stackable: bool = False

    def save_weight(self, host: nn.Module) -> Any:
        """What restore_weight needs to put the host's weight back bit for bit."""
        return self.snapshot(host) if self.snapshot is not None else self.matrix(host).detach().clone()

    def restore_weight(self, host: nn.Module, saved: Any) -> None:
        (self.restore if self.restore is not None else self.write)(host, saved)


def _linear_out(host, h, B):
    return F.linear(h, B)


def _linear_add_out(host, y, h, B):
    # y + h @ B.T as one addmm: the add rides on the GEMM instead of another pass over y (..., out).
    # In place: y is the fresh output of base(x), used nowhere else, and no backward needs it, so
    # this saves allocating (and on CPU, page-faulting in) a second (..., out) buffer per layer.
    rows = y.shape[:-1].numel()  # explicit: a rank-0 h makes reshape(-1, 0) ambiguous
    out = y.reshape(rows, y.shape[-1])  # a view of y when y is contiguous, else a copy
    return out.addmm_(h.reshape(rows, h.shape[-1]), B.T).view(y.shape)


def _write_linear(host, M):
    host.weight.data.copy_(M)


LINEAR = HostKind(
    name="linear",
    in_features=lambda m: m.in_features,
    out_features=lambda m: m.out_features,
    matrix=lambda m: m.weight,
    write=_write_linear,
    apply_in=lambda m, x, A: F.linear(x, A),
    apply_out=_linear_out,
    forward_with=lambda m, x, M: F.linear(x, M, m.bias),
    add_out=_linear_add_out,
    stackable=True,
)


def _write_conv1d(host, M):
    host.weight.data.copy_(M.T)


CONV1D = HostKind(
    name="conv1d",
    in_features=lambda m: m.weight.shape[0],
    out_features=lambda m: m.weight.shape[1],
    matrix=lambda m: m.weight.T,
    write=_write_conv1d,
    apply_in=lambda m, x, A: F.linear(x, A),
    apply_out=_linear_out,
    forward_with=lambda m, x, M: F.linear(x, M, m.bias),
    add_out=_linear_add_out,
)


def _embedding_lookup(m, x, M):
    # M is (dim, num); the layer's table is its transpose.
    return F.embedding(x, M.T, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)


def _write_embedding(host, M):
    host.weight.data.copy_(M.T)


EMBEDDING = HostKind(
    name="embedding",
    in_features=lambda m: m.num_embeddings,
    out_features=lambda m: m.embedding_dim,
    matrix=lambda m: m.weight.T,
    write=_write_embedding,
    apply_in=_embedding_lookup,
    apply_out=_linear_out,
    forward_with=_embedding_lookup,
    add_out=_linear_add_out,
    index_input=True,
)


def _conv2d_in(m, x, A):
    # A: (r, cin*kh*kw) -> a conv with r output channels and the host's geometry. (N, r, H', W')
    kernel = A.reshape(A.shape[0], m.in_channels, *m.kernel_size)
    return F.conv2d(x, kernel, None, m.stride, m.padding, m.dilation)


def _conv2d_out(m, h, B):
    # A 1x1 convolution: mix the r channels of h (N, r, H, W) into out channels.
    return torch.einsum("nrhw,or->nohw", h, B)


def _conv2d_forward(m, x, M):
    return m._conv_forward(x, M.reshape(m.weight.shape), m.bias)


def _write_conv2d(host, M):
    host.weight.data.copy_(M.reshape(host.weight.shape))


CONV2D = HostKind(
    name="conv2d",
    in_features=lambda m: m.weight[0].numel(),
    out_features=lambda m: m.out_channels,
    matrix=lambda m: m.weight.flatten(1),
    write=_write_conv2d,
    apply_in=_conv2d_in,
    apply_out=_conv2d_out,
    forward_with=_conv2d_forward,
    add_out=lambda m, y, h, B: y + _conv2d_out(m, h, B),
)


# Exact types only: a subclass may change forward in ways these views do not know about.
_KINDS: dict[type, HostKind] = {nn.Linear: LINEAR, nn.Embedding: EMBEDDING, nn.Conv2d: CONV2D}
if Conv1D is not None:
    _KINDS[Conv1D] = CONV1D

ALL_KINDS = ("linear", "conv1d", "embedding", "conv2d")
LINEAR_LIKE = ("linear", "conv1d")


# Kinds of layers from other libraries (quantized linears), by the library's top-level module
# name: the provider runs once, the first time a layer of that library is seen, so the library
# is imported only by whoever made such a layer.
_PROVIDERS: dict[str, Callable[[], dict[type, HostKind]]] = {}


def register_kinds(library: str, provider: Callable[[], dict[type, HostKind]]) -> None:
    """Teach host_kind the layer types of `library` (e.g. "bitsandbytes"); provider() -> {type: kind}."""
    _PROVIDERS[library] = provider


def host_kind(module: nn.Module) -> HostKind | None:
    """The HostKind of a module, or None if peftlab cannot adapt its weight."""
    kind = _KINDS.get(type(module))
    library = type(module).__module__.split(".")[0]
    if kind is None and library in _PROVIDERS:
        _KINDS.update(_PROVIDERS.pop(library)())
        kind = _KINDS.get(type(module))
    if kind is CONV2D and (module.groups != 1 or module.padding_mode != "zeros"):
        return None  # grouped or non-zero-padded convolutions have no single (out, in) matrix view
    return kind
