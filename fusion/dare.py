"""DARE (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch"): Drop And REscale the delta parameters before merging.

Per layer, with task vectors τ_i = ΔW_i (each LoRA's exact delta at weight 1) and weights w_i (LoRA weight ×
block weight), each entry of τ_i is dropped with probability p = 1 − ``density`` and the survivors are rescaled
by 1/(1 − p), which keeps E[τ̂_i] = τ_i; then, with PEFT's ``merge_utils``:

* ``method="linear"`` (DARE + task arithmetic, the paper's main combination): τ = Σ_i w_i τ̂_i
  (``dare_linear``);
* ``method="ties"`` (DARE + TIES sign election and disjoint mean): ``dare_ties``.

The paper's main results drop p = 0.9 of the deltas of full fine-tunes (``density=0.1``); LoRA deltas are
denser in information, and gentler rates (``density`` 0.3-0.7) are often better for them. The random masks are
deterministic: layer ``key`` uses seed ``seed + crc32(key)`` on the device the merge runs on (so masks on CPU
and CUDA differ for the same seed). The merged dense delta is factored by truncated SVD to ``rank`` (PEFT's
``dare_*_svd``), or kept dense with ``rank=-1``. Bias deltas are summed with the weights.
"""

from __future__ import annotations

import warnings
import zlib

import torch
from peft.utils.merge_utils import dare_linear, dare_ties

from pipelines.adapters.delta import LayerDelta

from .base import Param
from .weightspace import RANK_PARAM, LayerPart, WeightMerge, factor_dense, resolve_rank, split_parts


def layer_seed(seed: int, key: str) -> int:
    """The seed of layer ``key``'s drop masks: independent of the order layers are merged in."""
    return (seed + zlib.crc32(key.encode())) % (2**63)


class Dare(WeightMerge):
    name = "dare"
    summary = "DARE: random drop and rescale of the LoRA deltas, then a linear or TIES merge (PEFT merge_utils)"
    citation = "Yu et al. 2024, Language Models are Super Mario (DARE)"
    params = (
        Param("density", 0.1, "fraction of delta entries kept, 1 - drop rate p (the paper's p = 0.9)",
              min=1e-6, max=1.0),
        Param("method", "linear", "after drop-and-rescale: 'linear' (task arithmetic) or 'ties'",
              type=str, choices=("linear", "ties")),
        Param("majority_sign_method", "total", "sign election of method='ties': 'total' or 'frequency'",
              type=str, choices=("total", "frequency")),
        Param("seed", 0, "seed of the random drop masks", type=int, min=0),
        RANK_PARAM,
    )

    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        device = torch.device(base_weight.device if base_weight.device.type != "meta" else "cpu")
        tasks = [p.dense(base_weight, device) for p in parts]
        weights = torch.tensor([p.weight for p in parts], device=device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The density")  # density 1: PEFT warns and keeps all
            torch.manual_seed(layer_seed(self.seed, key))
            if self.method == "linear":
                merged = dare_linear(tasks, weights, self.density)
            else:
                merged = dare_ties(tasks, weights, self.density, self.majority_sign_method)
        _, _, bias = split_parts(parts, base_weight, device)
        return factor_dense(merged, resolve_rank(self.rank, parts), bias, "dare")
