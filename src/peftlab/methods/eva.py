"""EVA: Explained Variance Adaptation (Paischer et al. 2024, arXiv 2410.07170).

Paischer, Hauzenberger, Schmied, Alkin, Deisenroth, Hochreiter, "One Initialization to Rule them
All: Fine-tuning via Explained Variance Adaptation".

A data-driven initialisation of LoRA. For each target layer, the right singular vectors of its
inputs X (tokens x in) on calibration batches give the directions in which the layer's input
varies most; A starts as the top ones and B as zero:

    X = U S V^T (incremental PCA over batches)     A = V_k^T  (k, in)     B = 0  (out, k)
    h = W0 x + s * B A x                           (plain LoRA from then on; W0 untouched)

Ranks are redistributed across layers by explained variance: every site may take up to
round(rho * r) components; over all sites, the sum(r) components with the largest explained
variance ratio win, so a site ends with k in [0, rho * r] and the total stays sum(r).
Trained: A and B, as in LoRA. Output unchanged at init (B = 0).

Calibration (as `peft`'s `tuners/lora/eva.py`, which this follows step by step so that the same
batches give the same adapter):
  - the model runs in eval mode under no_grad; each site's input rows are its tokens, minus
    padding (`attention_mask`) and, with `use_label_mask`, minus tokens whose label is
    `label_mask_value`; batches without `input_ids`/`attention_mask` use every row;
  - sites that receive the very same input (query, key and value of one layer) share one PCA;
  - each PCA is an incremental PCA (scikit-learn's algorithm, sums in float64) whose per-batch
    SVD is torch's randomised `svd_lowrank` (q = 2 * components, 4 iterations, seed 42);
  - the batches are cycled until, for every site, the cosine similarity between consecutive
    estimates of each component it needs reaches `tau`; a site whose components have
    converged stops listening, and starts again if the redistribution asks it for more.
    `max_batches` bounds the loop (`peft` has no bound): not converging by then is an error.
  - `whiten` divides each component by sqrt(its singular value) (helps in vision, say the authors).
  - `adjust_scaling_factors` (default, as `peft`): s = alpha / r at every site whatever its new
    rank k, i.e. alpha_site = alpha * k / r, so gradients keep the same scale after redistribution.

The chosen ranks are written into the config's `ranks` field ({site: k}) during attach, so they are
saved with the adapter and a saved EVA adapter loads without calibration data. A site given k = 0
keeps an adapter with empty factors (no parameters, output unchanged); `peft` removes such layers.
"""
from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import PeftlabError
from ..hosts import LINEAR_LIKE
from ..linalg import top_r_svd
from ..registry import MethodConfig, Site, register
from ..targets import overrides_for
from .lora import LoRAAdapter


class IncrementalPCA:
    """Principal components of rows fed batch by batch (scikit-learn's IncrementalPCA).

    Keeps running mean and variance (float64 sums) and the top singular values/vectors; each
    new batch is stacked under the current components and re-decomposed. `converged[i]` says
    whether component i moved less than `tau` (cosine similarity) in the last update.
    """

    def __init__(self, n_components: int, tau: float, seed: int = 42, niter: int = 4):
        self.n_components, self.tau, self.seed, self.niter = n_components, tau, seed, niter
        self.seen = 0
        self.mean: Tensor | None = None  # (in,) float64
        self.var: Tensor | None = None  # (in,) float64
        self.components: Tensor | None = None  # (k, in)
        self.singular_values: Tensor | None = None  # (k,)
        self.explained_variance_ratio: Tensor | None = None  # (k,)
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    def _moments(self, x: Tensor) -> tuple[Tensor, Tensor, int]:
        # Chan et al.'s parallel update of mean and variance, in float64.
        n, total = x.shape[0], self.seen + x.shape[0]
        batch_sum = x.sum(0, dtype=torch.float64)
        centred = x - batch_sum / n
        batch_ssd = centred.square().sum(0, dtype=torch.float64) - centred.sum(0, dtype=torch.float64).square() / n
        if self.mean is None:
            return batch_sum / total, batch_ssd / total, total
        last_sum = self.mean * self.seen
        ratio = self.seen / n
        ssd = self.var * self.seen + batch_ssd + ratio / total * (last_sum / ratio - batch_sum).square()
        return (last_sum + batch_sum) / total, ssd / total, total

    def _svd(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Randomised SVD with a fixed seed, without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(self.seed)
            _, S, Vt = top_r_svd(x, 2 * self.n_components, self.niter)
        # Deterministic signs: the largest-magnitude entry of each right vector is positive.
        signs = torch.sign(Vt.gather(1, Vt.abs().argmax(1, keepdim=True)))
        return S, Vt * signs

    def partial_fit(self, x: Tensor) -> None:
        """x: (rows, in) float32."""
        previous = self.components
        mean, var, total = self._moments(x)
        if previous is None:
            x = (x - mean).to(x.dtype)  # centred in float64, kept in the batch's dtype
        else:
            # Stack the current components (scaled), the centred batch and a mean-correction row.
            batch_mean = x.mean(0)
            x = x - batch_mean
            correction = ((self.seen / total) * x.shape[0]) ** 0.5 * (self.mean - batch_mean)
            x = torch.cat([self.singular_values[:, None] * self.components, x, correction[None]])
        S, Vt = self._svd(x)
        k = self.n_components
        self.components, self.singular_values = Vt[:k], S[:k]
        self.explained_variance_ratio = S[:k] ** 2 / (var * total).sum()
        self.mean, self.var, self.seen = mean, var, total
        if previous is not None:
            self.converged = F.cosine_similarity(self.components, previous) >= self.tau


@register("eva")
@dataclass
class EVA(MethodConfig):
    r: int = 8  # the per-site rank budget (per-site values through overrides)
    alpha: float = 16.0
    dropout: float = 0.0
    rho: float = 2.0  # a site may take up to round(rho * r) components
    tau: float = 0.99  # cosine similarity at which a component counts as converged
    whiten: bool = False
    adjust_scaling_factors: bool = True
    use_label_mask: bool = True
    label_mask_value: int = -100
    max_batches: int = 1000  # calibration batches (cycled) before giving up on convergence
    ranks: dict = field(default_factory=dict)  # {site: rank}: written by calibration, saved with the adapter

    hosts = LINEAR_LIKE
    needs_calibration = True
    trainable_formula = "k * (in + out) per site; k in [0, rho*r] by explained variance, sum(k) = sum(r)"

    def validate(self) -> None:
        self.check_positive_int("r")
        if self.rho < 1:
            raise PeftlabError(f"EVA rho must be >= 1 (1 = no redistribution), got {self.rho!r}")
        if not 0 <= self.tau <= 1:
            raise PeftlabError(f"EVA tau is a cosine similarity in [0, 1], got {self.tau!r}")
        self.check_dropout()
        self.check_positive_int("max_batches")

    def validate_site(self, site: Site) -> None:
        if round(self.r * self.rho) > site.in_features:
            raise PeftlabError(
                f"EVA needs up to round(r * rho) = {round(self.r * self.rho)} input components at {site.name}, "
                f"which has only {site.in_features} inputs: lower r or rho, or override r for this site"
            )

    def scale(self, rank: int) -> float:
        return self.alpha / (self.r if self.adjust_scaling_factors or rank == 0 else rank)

    # ---- calibration ------------------------------------------------------------------------

    def calibrate(self, model, sites: list[Site], calibration) -> dict[str, Tensor]:
        """{site: A0 (k, in)}: the top principal directions of each site's inputs; sets self.ranks."""
        batches = list(calibration)
        if not batches:
            raise PeftlabError("EVA got no calibration batches: pass calibration=[batch, ...] (dicts of model inputs)")
        budget = {s.name: self.at_site(overrides_for(s.name, s.host, self.overrides)).r for s in sites}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                components = self._fit(model, sites, batches, budget)
        finally:
            model.train(was_training)
        self.ranks = {name: int(c.shape[0]) for name, c in components.items()}
        return components

    def _rows(self, x: Tensor, mask: Tensor | None) -> Tensor:
        """A site's input as (rows, in): its tokens, without the masked ones."""
        if mask is not None and x.shape[:-1] == mask.shape:
            return x[mask].float()
        return x.reshape(-1, x.shape[-1]).float()

    def _mask(self, batch: dict) -> Tensor | None:
        if "attention_mask" not in batch and "input_ids" not in batch:
            return None
        mask = batch.get("attention_mask", torch.ones_like(batch.get("input_ids"))).bool()
        if self.use_label_mask and "labels" in batch and batch["labels"].shape == mask.shape:
            mask = mask & (batch["labels"] != self.label_mask_value)
        return mask

    def _forward(self, model, sites: list[Site], batch: dict, listen) -> None:
        """Run one batch; listen(site_name, rows) sees each site's input rows."""
        device = sites[0].weight.device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        mask = self._mask(batch)

        def hook(name: str):
            def see_input(module, args, output) -> None:  # returns None: the output is left alone
                listen(name, self._rows(args[0], mask))
            return see_input

        handles = [s.host.register_forward_hook(hook(s.name)) for s in sites]
        try:
            model(**batch)
        finally:
            for h in handles:
                h.remove()

    def _fit(self, model, sites: list[Site], batches: list[dict], budget: dict[str, int]) -> dict[str, Tensor]:
        # 1. Sites that see identical inputs on the first batch share one PCA (their leader's).
        first: dict[str, Tensor] = {}
        self._forward(model, sites, batches[0], lambda name, rows: first.setdefault(name, rows))
        groups: list[list[str]] = []
        for s in sites:
            group = next((g for g in groups if torch.equal(first[g[0]], first[s.name])), None)
            group.append(s.name) if group is not None else groups.append([s.name])
        leader_of = {name: g[0] for g in groups for name in g}
        followers = [name for g in groups for name in g[1:]]
        leaders = [g[0] for g in groups]
        # Each site may take round(rho * r) components; a shared PCA keeps the most any member may take.
        most = {name: round(budget[name] * self.rho) for name in leader_of}
        for g in groups:
            for name in g:
                most[name] = max(most[n] for n in g)
        pcas = {name: IncrementalPCA(most[name], self.tau) for name in leaders}

        # 2. Cycle the batches until every leader's needed components have converged.
        ranks = dict(most)
        listening = set(leaders)

        def listen(name: str, rows: Tensor) -> None:
            if name in listening and rows.shape[0] >= pcas[name].n_components:  # too few rows: skip the batch
                pcas[name].partial_fit(rows)

        for batch in itertools.islice(itertools.cycle(batches), self.max_batches):
            for name in leaders:
                done = bool(pcas[name].converged[: ranks[name]].all())
                listening.discard(name) if done else listening.add(name)
            if not listening:
                break
            self._forward(model, sites, batch, listen)
            if all(p.components is not None for p in pcas.values()):
                ranks = self._distribute(leaders + followers, leader_of, pcas, most, sum(budget.values()))
        else:
            raise PeftlabError(
                f"EVA components did not converge (tau={self.tau}) within max_batches={self.max_batches} "
                f"calibration batches at {sorted(listening)[:3]}: pass more or longer batches, raise max_batches, "
                "or lower tau"
            )

        # 3. A0 of each site: its leader's top-k components (whitened on request).
        out = {}
        for s in sites:
            pca, k = pcas[leader_of[s.name]], ranks[s.name]
            a = pca.components[:k]
            if self.whiten:
                a = a / pca.singular_values[:k].sqrt()[:, None]
            out[s.name] = a
        return out

    @staticmethod
    def _distribute(order: list[str], leader_of: dict[str, str], pcas: dict[str, IncrementalPCA],
                    most: dict[str, int], total: int) -> dict[str, int]:
        """Give the `total` ranks to the components with the largest explained variance ratio.

        Sites that share a PCA have equal ratios; the ties are broken in `order` (leaders, then the
        others), and a leader then takes the largest rank of its group so that its convergence
        check covers every member. Both choices follow `peft`, so the ranks agree with it.
        """
        owners, ratios = [], []
        for name in order:
            r = pcas[leader_of[name]].explained_variance_ratio[: most[name]]
            owners += [name] * r.shape[0]
            ratios.append(r)
        best = torch.cat(ratios).argsort(descending=True)[:total]
        counts = Counter(owners[i] for i in best.tolist())
        ranks = {name: counts.get(name, 0) for name in order}
        for name, leader in leader_of.items():
            if name != leader and ranks[name] > ranks[leader]:
                ranks[name], ranks[leader] = ranks[leader], ranks[name]
        return ranks

    # ---- build ------------------------------------------------------------------------------

    def build(self, site: Site, stats: Tensor | None = None, initialize: bool = True) -> LoRAAdapter:
        if initialize:
            rank = stats.shape[0]
        elif site.name in self.ranks:
            rank = int(self.ranks[site.name])
        else:
            raise PeftlabError(
                f"this EVA config has no rank for {site.name}: ranks are chosen by calibration; "
                "load an adapter saved after attach(..., calibration=...), or attach with calibration data"
            )
        adapter = LoRAAdapter(site.kind, site.in_features, site.out_features, rank, self.scale(rank), self.dropout,
                              site.weight.dtype)
        if initialize:
            with torch.no_grad():
                adapter.A.copy_(stats.to(site.weight.dtype))  # B stays 0: the output is unchanged at init
        return adapter
