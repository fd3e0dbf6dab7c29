"""A quantized frozen base: the model's linear layers held in 4 or 8 bits, adapters on top (QLoRA).

    summary = peftlab.quantize.quantize(model, "nf4")      # or "int8"; heads stay in full precision
    peftlab.attach(model, peftlab.LoRA(r=8, targets="all-linear"))
    ...train: only the adapters' parameters change; the packed base weights never do...
    peftlab.merge(model)            # dequantize, add the change, requantize: the error is warned
    peftlab.quantize.merge_errors(model)                   # ... and kept, per adapter and layer

Schemes (Dettmers et al. 2023, QLoRA, arXiv 2305.14314; 2022, LLM.int8(), arXiv 2208.07339):
    "nf4"   4-bit NormalFloat, one absmax per block of 64 weights of a row (32 where 64 does not
            divide the row; a layer neither divides stays in full precision), no double quantization:
            W ~ absmax_b * code[q_ij], code the 16 quantiles of N(0, 1) scaled to [-1, 1]
    "int8"  8-bit, one absmax per output row: W ~ SCB_i / 127 * q_ij, weight-only (the inputs
            stay in full precision, in training and in eval)
The computation runs in the layer's dtype (fp32 here) on the dequantized weight.

The library: bitsandbytes (its Linear4bit and Linear8bitLt), because `peft` users quantize with
it, its 4- and 8-bit layers run forward and backward on CPU (0.49+) and on GPUs, and a model
quantized by transformers' BitsAndBytesConfig is recognised as it is. Two things it does that
we undo, found on this machine:
  - On import, on CPUs with AVX512-BF16, it asks the Hugging Face hub for a fused 4-bit kernel
    ("kernels-community/quantization-bitsandbytes"): a DNS lookup and an HTTP request (or, with
    HF_HUB_OFFLINE=1, a cache miss) and a warning, in every process that imports it, and `import
    peft` does. Importing peftlab installs an import hook (`_QuietBitsandbytesImport`) so that
    bitsandbytes, whoever imports it, imports with the `kernels` package hidden and falls back to
    the kernels it ships: no network attempt. The hub kernel only serves bf16 single-row
    inference, which we turn off anyway (below). Measured here, a script quantizing, training and
    merging exits as soon as it prints its last line; importing bitsandbytes costs ~5 s (it
    imports torch._dynamo), paid only by processes that quantize or import peft.
  - In eval mode its CPU layers switch paths: Linear4bit repacks its weight in place and computes
    in bf16, Linear8bitLt quantizes the inputs to int8 too. We turn the first off
    (`support_avx512bf16_for_cpu = False`) and pin the second to its weight-only path, so eval
    computes what training did and the packed weights never change under a forward.
torchao's int8/int4 weight-only and HQQ were the alternatives; not needed.

Attaching (see peftlab.core): a quantized layer is a `linear` host whose HostKind is quantized
(hosts.py): `Site.weight` is its dequantized fp32 weight, a merge requantizes, and undoing a merge
puts the packed original back (never a second requantization). A method declares whether it
works on such a base (`MethodConfig.quantized_base`); attach refuses, before any change, a
method declared "no", an initialisation that would rewrite the quantized weight (PiSSA's
residual), and training a quantized weight in place.

Loading without the full-precision model: `load_quantized(skeleton, tensors, scheme, loftq=...)` fills a
model built on the meta device from a lazy source of tensors (a safetensors file read one tensor at a
time) and quantizes each linear layer as its weight is read (LoftQ fitted there too), so the peak holds
the packed layers, the layers kept in full precision and one full-precision weight; the result equals
quantize() on the loaded model bit for bit. The training recipe loads a quantized base this way
(peftlab.recipe.models).

For a plain checkpoint of the adapted model, `dequantize_model(model)` replaces the quantized
layers by nn.Linear with their dequantized weights (adapters stay attached, unmerged), and
`peftlab.detach(model, keep_merged=True)` then merges in full precision: exactly Q(W) + change,
with no requantization.

LoftQ (Li et al. 2023, arXiv 2310.08659): `quantize(model, scheme, loftq=LoRA(init="loftq", ...))`
quantizes and attaches a LoRA whose s B A fits what quantization lost. For T = loftq_iters:
    Q_t = q(W - s B_{t-1} A_{t-1})   (B_0 A_0 = 0)        s B_t A_t = top-r SVD of (W - Q_t)
The layer keeps Q_T; ||W - (Q_T + s B_T A_T)||_F < ||W - q(W)||_F. With T = 1 this is peft's
`replace_lora_weights_loftq`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import core
from .errors import PeftlabError
from .hosts import LINEAR, HostKind, register_kinds
from .linalg import top_r_svd
from .registry import MethodConfig
from .targets import check_patterns, matches, overrides_for

SCHEMES = ("nf4", "int8")
NF4_BLOCKSIZES = (64, 32)  # weights per absmax: QLoRA's 64, else 32 for rows 64 does not divide


def nf4_blocksize(in_features: int) -> int | None:
    """The NF4 block for rows of `in_features` weights, None when none fits. bitsandbytes 0.50's CPU
    dequantization reads a block that straddles two rows with the wrong scale (a 32 x 32 weight comes
    back 37% off instead of 9%), so a block never straddles rows here."""
    return next((b for b in NF4_BLOCKSIZES if in_features % b == 0), None)


# ---- the library ------------------------------------------------------------------------------


@contextlib.contextmanager
def _hub_kernels_hidden():
    """While bitsandbytes imports: `from kernels import get_kernel` raises ImportError (the `kernels`
    package is hidden, even when transformers imported it already), so bitsandbytes keeps the kernels
    it ships: no hub request, no thread, no warning."""
    kernels = sys.modules.get("kernels")
    sys.modules["kernels"] = None
    cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_log.level
    cpu_log.setLevel(logging.ERROR)  # its "failed to load the hub kernel" warning: expected, nothing to fix
    try:
        yield
    finally:
        cpu_log.setLevel(level)
        if kernels is None:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels


class _QuietBitsandbytesImport(importlib.abc.MetaPathFinder):
    """Whoever imports bitsandbytes first (peftlab, `import peft`, transformers), it imports with the hub
    kernel lookup off. Installed when peftlab.quantize is imported; it steps aside after that one import."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != "bitsandbytes":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module: Any) -> None:
                with _hub_kernels_hidden():
                    run(module)

            spec.loader.exec_module = exec_module
        return spec


if "bitsandbytes" not in sys.modules and not any(isinstance(f, _QuietBitsandbytesImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietBitsandbytesImport())


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise PeftlabError("a quantized base needs bitsandbytes: pip install 'bitsandbytes>=0.49'") from None
    return bitsandbytes


@functools.cache
def _int8_linear() -> type:
    """bitsandbytes' Linear8bitLt, weight-only in eval too (its CPU training path: x @ dequant(W).T)."""
    bnb = _bitsandbytes()

    class Int8Linear(bnb.nn.Linear8bitLt):
        """Linear8bitLt whose eval forward is its training forward: no int8 rounding of the inputs."""

        def forward(self, x: Tensor) -> Tensor:
            self.state.is_training = True  # bnb.matmul on CPU: MatMul8bitFp, dequantize then F.linear
            return bnb.matmul(x, self.weight, bias=self.bias, state=self.state)

    Int8Linear.__module__, Int8Linear.__qualname__ = __name__, "Int8Linear"  # pickles as peftlab.quantize.Int8Linear
    globals()["Int8Linear"] = Int8Linear
    register_kinds("peftlab", lambda: {Int8Linear: QUANTIZED_LINEAR})
    return Int8Linear


def __getattr__(name: str) -> Any:
    if name == "Int8Linear":  # defined on first use (it subclasses bitsandbytes' layer); unpickling asks here
        return _int8_linear()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _scheme(module: nn.Module) -> str | None:
    """"nf4", "fp4", "int8" or None (not a bitsandbytes linear)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:  # no such layer can exist before its library is imported
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "nf4" if module.weight.quant_type == "nf4" else "fp4"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def is_quantized(module: nn.Module) -> bool:
    """A linear layer whose weight bitsandbytes holds in 4 or 8 bits."""
    return _scheme(module) is not None


# ---- one layer: quantize, dequantize, requantize, exact undo -----------------------------------


def _nf4_param(weight: Tensor, module: nn.Module, blocksize: int, quant_type: str = "nf4") -> nn.Parameter:
    bnb = _bitsandbytes()
    param = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, quant_type=quant_type,
                              blocksize=blocksize, compress_statistics=False, module=module)
    return param.to(weight.device)  # .to quantizes: packed uint8 ((out * in + 1) // 2, 1) + quant_state


def _int8_state(weight: Tensor) -> tuple[nn.Parameter, Tensor, Tensor]:
    """(the layer's weight parameter, CB int8 (out, in), SCB fp32 (out,)): one absmax per row."""
    bnb = _bitsandbytes()
    CB, SCB, _ = bnb.functional.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
    return bnb.nn.Int8Params(CB, requires_grad=False, has_fp16_weights=False), CB, SCB


def quantized_linear(linear: nn.Linear, scheme: str, weight: Tensor | None = None) -> nn.Module:
    """A bitsandbytes layer computing `linear` with its weight (or `weight`, (out, in)) quantized;
    the bias is the same Parameter object."""
    bnb = _bitsandbytes()
    weight = linear.weight if weight is None else weight
    has_bias = linear.bias is not None
    if scheme == "nf4":
        if nf4_blocksize(linear.in_features) is None:
            raise PeftlabError(f"NF4 needs rows of a multiple of 32 weights, this layer's have {linear.in_features}: "
                               "keep it in full precision (exclude it) or use int8")
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                  compute_dtype=linear.weight.dtype, compress_statistics=False, quant_type="nf4",
                                  device="meta")
        layer.support_avx512bf16_for_cpu = False  # no in-place repacking, no bf16 compute in eval
        layer.weight = _nf4_param(weight, layer, nf4_blocksize(linear.in_features))
    else:
        layer = _int8_linear()(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                               threshold=0.0, device="meta")
        param, CB, SCB = _int8_state(weight)
        _put_int8(layer, (param, CB, SCB))
    if has_bias:
        layer.bias = linear.bias
    return layer.train(linear.training)


def _put_int8(layer: nn.Module, packed: tuple[nn.Parameter, Tensor, Tensor]) -> None:
    param, CB, SCB = packed
    layer.weight = param
    layer.state.CB, layer.state.SCB = CB, SCB  # where its forward reads them


def dequantized_weight(module: nn.Module) -> Tensor:
    """The weight a quantized layer computes with, as a new (out, in) tensor in its compute dtype."""
    scheme = _scheme(module)
    if scheme is None:
        raise PeftlabError(f"{type(module).__name__} is not a quantized linear layer: read its .weight")
    bnb = sys.modules["bitsandbytes"]
    if scheme == "int8":
        state = module.state
        CB = module.weight.CB if state.CB is None else state.CB  # a layer bitsandbytes made and never ran
        SCB = module.weight.SCB if state.SCB is None else state.SCB
        # MatMul8bitFp's arithmetic exactly, so merged and unmerged forwards agree
        return CB.to(torch.float32).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))
    weight = module.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).reshape(module.out_features,
                                                                                  module.in_features)


def requantize(module: nn.Module, weight: Tensor) -> None:
    """Quantize `weight` (out, in) into the layer, in place of its packed weight (which is not changed:
    a snapshot of it stays valid)."""
    scheme = _scheme(module)
    weight = weight.detach().to(torch.float32)
    if scheme in ("nf4", "fp4"):
        packed = module.weight
        module.weight = _nf4_param(weight.to(packed.quant_state.dtype), module, packed.blocksize, scheme)
    elif scheme == "int8":
        _put_int8(module, _int8_state(weight))
    else:
        raise PeftlabError(f"{type(module).__name__} is not a quantized linear layer (nf4 or int8)")


def packed_weight(module: nn.Module) -> Any:
    """The layer's packed weight as it is: what restore_packed puts back bit for bit."""
    if _scheme(module) == "int8":
        return module.weight, module.state.CB, module.state.SCB
    return module.weight


def restore_packed(module: nn.Module, packed: Any) -> None:
    if _scheme(module) == "int8":
        _put_int8(module, packed)
    else:
        module.weight = packed
        module.quant_state = packed.quant_state


def quantize_dequantize(weight: Tensor, scheme: str) -> Tensor:
    """q(W) as an (out, in) fp32 matrix: what a layer quantized from `weight` computes with."""
    check_scheme(scheme)
    shell = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    return dequantized_weight(quantized_linear(shell, scheme, weight.float()))


QUANTIZED_LINEAR = HostKind(
    name="linear",  # to a method it is a linear layer: y = x W^T + b
    in_features=lambda m: m.in_features,
    out_features=lambda m: m.out_features,
    matrix=dequantized_weight,
    write=requantize,
    apply_in=LINEAR.apply_in,
    apply_out=LINEAR.apply_out,
    forward_with=LINEAR.forward_with,
    add_out=lambda m, y, h, B: torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), B.T).view(y.shape),
    # out of place: bitsandbytes' forward returns a view made inside its autograd Function (no in-place add)
    quantized=True,
    snapshot=packed_weight,
    restore=restore_packed,
)


def _bitsandbytes_kinds() -> dict[type, HostKind]:
    bnb = sys.modules["bitsandbytes"]
    return {bnb.nn.Linear4bit: QUANTIZED_LINEAR, bnb.nn.Linear8bitLt: QUANTIZED_LINEAR}


register_kinds("bitsandbytes", _bitsandbytes_kinds)


# ---- the model ---------------------------------------------------------------------------------


@dataclass
class QuantizeSummary:
    """What quantize() did: the layers it quantized, the linear layers it kept, the weight bytes."""

    scheme: str
    layers: list[str]
    kept: list[str]  # linear layers left in full precision: output heads, `exclude`, tied weights, rows no
    # NF4 block divides
    bytes_before: int  # the quantized layers' weights in full precision
    bytes_after: int  # ... packed, with their scales
    loftq: dict[str, tuple[float, float]] = field(default_factory=dict)  # site -> (||W - q(W)||_F,
    # ||W - (Q + s B A)||_F) when LoftQ initialised a LoRA there

    def __str__(self) -> str:
        return (f"{self.scheme}: {len(self.layers)} linear layers quantized, {len(self.kept)} kept in full precision; "
                f"weights {self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")


def check_scheme(scheme: Any) -> None:
    """A known scheme, else the error naming the known ones."""
    if scheme not in SCHEMES:
        raise PeftlabError(f"unknown quantization {scheme!r}: use one of {', '.join(map(repr, SCHEMES))}")


def _choose(model: nn.Module, scheme: str, exclude: Any) -> tuple[list[str], list[str]]:
    """(names of the nn.Linear layers to quantize, names of linear layers kept in full precision)."""
    check_patterns("quantize exclude", exclude)
    skip = [] if exclude is None else [exclude] if isinstance(exclude, str) or callable(exclude) else list(exclude)
    uses = {}
    for _, p in model.named_parameters(remove_duplicate=False):  # a tied weight (lm_head = embeddings) is used twice
        uses[id(p)] = uses.get(id(p), 0) + 1
    chosen, kept = [], []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        wanted = matches("all-linear", name, module) and not any(matches(p, name, module) for p in skip)
        fits = scheme != "nf4" or nf4_blocksize(module.in_features) is not None
        (chosen if wanted and fits and uses[id(module.weight)] == 1 else kept).append(name)
    return chosen, kept


def quantize(model: nn.Module, scheme: str, exclude: Any = None, *, loftq: MethodConfig | None = None,
             adapter_name: str = "default") -> QuantizeSummary:
    """Replace the model's nn.Linear layers, output heads and `exclude` aside, by bitsandbytes' quantized
    layers holding the same weights in `scheme` ("nf4" or "int8"). In place; every check comes first.

    exclude: patterns as in targets (names, globs, "re:" regexes, callables) of layers to keep.
    loftq: a LoRA config with init="loftq": its targets are quantized to Q_T and the LoRA is attached
    under `adapter_name` with A, B from LoftQ (see the module docstring).
    """
    chosen, kept, plan = _checked_plan(model, scheme, exclude, loftq)
    modules = dict(model.named_modules())
    summary = QuantizeSummary(scheme, chosen, kept, 0, 0)
    state_dict = {}
    for name in chosen:
        _quantize_layer(model, name, modules[name].weight, summary, plan.get(name), state_dict, adapter_name)
    if loftq is not None:
        core.attach(model, loftq, adapter_name, state_dict=state_dict)
    return summary


def _checked_plan(model: nn.Module, scheme: str, exclude: Any, loftq: MethodConfig | None
                  ) -> tuple[list[str], list[str], dict[str, tuple]]:
    """(layers to quantize, linear layers kept, LoftQ site -> (r, scale, iters)): every check of quantize()
    and load_quantized(), before either changes anything."""
    check_scheme(scheme)
    if model.__dict__.get("_peftlab") is not None:
        raise PeftlabError("quantize before attaching: this model has peftlab adapters (detach them, quantize, "
                           "then attach)")
    chosen, kept = _choose(model, scheme, exclude)
    if not chosen:
        found = sorted({type(m).__name__ for m in model.modules() if isinstance(getattr(m, "weight", None), Tensor)})
        raise PeftlabError(f"quantize found no layer to quantize: it replaces torch.nn.Linear layers other than "
                           f"output heads and `exclude` (NF4: rows of a multiple of 32), and this model has {', '.join(found) or 'no weights'}"
                           f"{' (kept: ' + ', '.join(kept[:4]) + ')' if kept else ''}: quantize a model with linear "
                           "layers, or narrow exclude")
    plan = _loftq_plan(model, loftq, chosen, scheme) if loftq is not None else {}
    _bitsandbytes()
    return chosen, kept, plan


def _quantize_layer(model: nn.Module, name: str, weight: Tensor, summary: QuantizeSummary, loftq: tuple | None,
                    state_dict: dict[str, Tensor], adapter_name: str) -> None:
    """Replace the nn.Linear `name` by its quantized layer holding `weight` (out, in), or with LoftQ
    ((r, scale, iters)) W - s B A, A and B going to `state_dict` for the adapter."""
    linear = model.get_submodule(name)
    dtype = linear.weight.dtype
    if loftq is not None:
        target, A, B, summary.loftq[name] = _loftq_layer(weight, summary.scheme, *loftq)
        state_dict[f"{name}.{core.ADAPTERS}.{adapter_name}.A"] = A.to(dtype)
        state_dict[f"{name}.{core.ADAPTERS}.{adapter_name}.B"] = B.to(dtype)
        weight = target
    layer = quantized_linear(linear, summary.scheme, weight)
    summary.bytes_before += linear.weight.numel() * linear.weight.element_size()
    summary.bytes_after += _packed_bytes(layer)
    _replace(model, name, layer)


# ---- a quantized model loaded layer by layer ---------------------------------------------------


def load_quantized(model: nn.Module, tensors: Mapping[str, Tensor], scheme: str, exclude: Any = None, *,
                   loftq: MethodConfig | None = None, adapter_name: str = "default") -> QuantizeSummary:
    """Fill `model`, a skeleton whose weights are on the meta device (built under torch.device("meta") or
    accelerate.init_empty_weights), from `tensors` (state-dict key -> tensor, read when asked: e.g. one
    tensor at a time from a safetensors file), quantizing what quantize() would quantize straight from
    each weight as it is read. The full-precision weights of the quantized layers are never all in
    memory: one at a time. The result is the model that filling it and calling quantize() gives, bit
    for bit (the quantizers are deterministic); LoftQ too, fitted to each weight as it arrives.

    Tied weights stay tied (one tensor, read under any of its keys). Every parameter (and persistent
    buffer) left on the meta device must be in `tensors`: a new head's weights are initialised by the
    caller first. Every check, keys included, comes before the first tensor is read; a tensor of the
    wrong shape stops the load midway, leaving the skeleton unusable.
    """
    chosen, kept, plan = _checked_plan(model, scheme, exclude, loftq)
    empty = _unfilled(model, tensors)
    unread = [keys[0] for keys, _ in empty.values() if not any(k in tensors for k in keys)]
    if unread:
        raise PeftlabError(f"load_quantized has no value for {len(unread)} of the model's meta tensors, e.g. "
                           f"{unread[0]}: give every weight in `tensors`, or initialise the new ones first")
    quantized = {f"{name}.weight" for name in chosen}
    for keys, places in empty.values():
        if quantized.isdisjoint(keys):  # embeddings, norms, biases, heads: as they are
            key = next(k for k in keys if k in tensors)
            _put(places, _read(tensors, key, places[0][2]))
    summary = QuantizeSummary(scheme, chosen, kept, 0, 0)
    state_dict = {}
    for name in chosen:  # one full-precision weight in memory at a time
        key = f"{name}.weight"
        weight = _read(tensors, key, model.get_submodule(name).weight)
        _quantize_layer(model, name, weight, summary, plan.get(name), state_dict, adapter_name)
        del weight
    if loftq is not None:
        core.attach(model, loftq, adapter_name, state_dict=state_dict)
    return summary


def _unfilled(model: nn.Module, tensors: Mapping[str, Tensor]
              ) -> dict[int, tuple[list[str], list[tuple[nn.Module, str, Tensor]]]]:
    """What load_quantized fills, one entry per tensor: (its state-dict keys, its places as (module,
    attribute, tensor)). The parameters and persistent buffers on the meta device, and the persistent
    buffers `tensors` has a value for (built on the CPU, e.g. by init_empty_weights). A tied weight has
    two keys and two places."""
    found: dict[int, tuple[list[str], list[tuple[nn.Module, str, Tensor]]]] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        persistent = [(n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        for attribute, tensor in [*module._parameters.items(), *persistent]:
            key = f"{prefix}.{attribute}" if prefix else attribute
            if tensor is not None and (tensor.is_meta or (attribute in module._buffers and key in tensors)):
                keys, places = found.setdefault(id(tensor), ([], []))
                keys.append(key)
                places.append((module, attribute, tensor))
    return found


def _read(tensors: Mapping[str, Tensor], key: str, like: Tensor) -> Tensor:
    """tensors[key] in `like`'s dtype, checked against its shape."""
    value = tensors[key]
    if tuple(value.shape) != tuple(like.shape):
        raise PeftlabError(f"tensor {key} has shape {tuple(value.shape)}, the model needs {tuple(like.shape)}: "
                           "the checkpoint belongs to another model or config")
    return value.to(like.dtype)


def _put(places: list[tuple[nn.Module, str, Tensor]], value: Tensor) -> None:
    """`value` in every place of one meta tensor: a parameter stays a parameter (one object for tied weights)."""
    old = places[0][2]
    if isinstance(old, nn.Parameter):
        value = nn.Parameter(value, requires_grad=old.requires_grad)
    for module, attribute, _ in places:
        (module._parameters if isinstance(old, nn.Parameter) else module._buffers)[attribute] = value


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _packed_bytes(layer: nn.Module) -> int:
    tensors = [t for t in layer.state_dict().values() if isinstance(t, Tensor)]
    bias = 0 if layer.bias is None else layer.bias.numel() * layer.bias.element_size()
    return sum(t.numel() * t.element_size() for t in tensors) - bias


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every quantized linear layer by an nn.Linear holding its dequantized weight (in `dtype`);
    the names replaced. Attached, unmerged adapters move to the new layer and compute the same, so
    `peftlab.detach(model, keep_merged=True)` afterwards merges in full precision: a plain checkpoint."""
    names = [n for n, m in model.named_modules() if is_quantized(m)]
    if not names:
        raise PeftlabError("dequantize_model found no quantized layer: this model is in full precision already")
    core.check_rehost(model, names)  # refuses a merged adapter before any change
    modules = dict(model.named_modules())
    for name in names:
        old = modules[name]
        linear = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta", dtype=dtype)
        linear.weight = nn.Parameter(dequantized_weight(old).to(dtype), requires_grad=old.weight.requires_grad)
        if old.bias is not None:
            linear.bias = old.bias
        linear.train(old.training)
        core.rehost(model, name, linear, LINEAR)
        _replace(model, name, linear)
    return names


# ---- merging into a quantized base -------------------------------------------------------------


def merge_errors(model: nn.Module) -> dict[str, dict[str, tuple[float, float]]]:
    """What requantization added when merging into quantized layers: adapter name -> layer ->
    (max |W_merged - W_exact|, ||W_merged - W_exact||_F / ||W_exact||_F), W_exact the fp32 merge of the
    dequantized weight. Empty when nothing is merged into a quantized layer."""
    state = model.__dict__.get("_peftlab")
    return {} if state is None else {n: dict(sites) for n, sites in state.merge_errors.items() if sites}


# ---- LoftQ ---------------------------------------------------------------------------------------


def loftq_factors(weight: Tensor, scheme: str, r: int, scale: float, iters: int = 1
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(the matrix to quantize, A (r, in), B (out, r)) for LoftQ with T = iters: the layer quantized from
    the first holds Q_T, and Q_T + scale * B @ A is close to `weight` (out, in). All fp32."""
    check_scheme(scheme)
    W = weight.detach().float()
    low_rank = torch.zeros_like(W)  # s B_{t-1} A_{t-1}
    for _ in range(iters):
        target = W - low_rank
        U, S, Vh = top_r_svd(W - quantize_dequantize(target, scheme), r)
        root = (S / scale).sqrt()  # s B A = U diag(S) Vh, split evenly between B and A
        A, B = root[:, None] * Vh, U * root
        low_rank = scale * (B @ A)
    return target, A, B


def _loftq_plan(model: nn.Module, config: MethodConfig, chosen: list[str], scheme: str) -> dict[str, tuple]:
    """site -> (r, scale, iters) for a LoftQ LoRA config, checked against the layers to quantize."""
    if config.method != "lora" or getattr(config, "init", None) != "loftq":
        raise PeftlabError(f"quantize(loftq=...) takes a LoRA config with init='loftq', got {config.method!r}"
                           f"{' init=' + repr(config.init) if config.method == 'lora' else ''}: "
                           "pass peftlab.LoRA(init='loftq', ...)")
    plan = {}
    for site in core.sites_for(model, config):
        if site.name not in chosen:
            raise PeftlabError(f"LoftQ target {site.name} is not quantized here (an output head, excluded, tied or not "
                               "an nn.Linear): narrow the LoRA's targets or exclude")
        at_site = config.at_site(overrides_for(site.name, site.host, config.overrides))
        site.check_rank(at_site.r, "LoftQ LoRA")
        plan[site.name] = (at_site.r, at_site.scale, at_site.loftq_iters)
    return plan


def _loftq_layer(weight: Tensor, scheme: str, r: int, scale: float, iters: int
                 ) -> tuple[Tensor, Tensor, Tensor, tuple[float, float]]:
    target, A, B = loftq_factors(weight, scheme, r, scale, iters)
    W = weight.detach().float()
    before = torch.linalg.matrix_norm(W - quantize_dequantize(W, scheme)).item()
    after = torch.linalg.matrix_norm(W - quantize_dequantize(target, scheme) - scale * (B @ A)).item()
    return target, A, B, (before, after)
