"""Which linear layers of a denoiser are quantized, and how.

Following Nunchaku's FLUX.1 and SDXL models (mit-han-lab/nunchaku, read for reference):

* FLUX.1 transformer blocks, **W4A4** (4-bit weights and activations, smoothing, low-rank branch): attention
  ``to_q/to_k/to_v`` and ``add_q_proj/add_k_proj/add_v_proj``, ``to_out.0``, ``to_add_out``, the
  feed-forward ``ff``/``ff_context`` ``net.0.proj`` and ``net.2``, and the single blocks' ``proj_mlp`` and
  ``proj_out``. **W4A16** (4-bit weights only): the adaLN modulation linears ``norm1.linear``,
  ``norm1_context.linear`` and the single blocks' ``norm.linear`` (a quarter of FLUX.1's weights; Nunchaku
  stores them as AWQ W4A16).
* SDXL ``BasicTransformerBlock``s, **W4A4**: self-attention ``attn1.to_q/to_k/to_v/to_out.0``, cross-attention
  ``attn2.to_q/to_out.0`` and the feed-forward ``ff.net.0.proj`` (GEGLU) and ``ff.net.2``. The cross-attention
  ``to_k/to_v``, which read the 77 text tokens, stay 16-bit as in Nunchaku.

Everything else stays 16-bit: embedders, resnets and convolutions, norms, the final ``norm_out``/``proj_out``,
biases. A target layer whose input width does not split into quantization groups is kept 16-bit and reported;
the low-rank branch rank is ``min(rank, min(in, out) // 2)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_FLUX_BLOCK = r"(transformer_blocks|single_transformer_blocks)\.\d+\."
FLUX_W4A4 = re.compile(
    _FLUX_BLOCK + r"(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)|proj_mlp|proj_out)$"
)
FLUX_W4A16 = re.compile(_FLUX_BLOCK + r"(norm1|norm1_context|norm)\.linear$")
_SDXL_BLOCK = r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+\.transformer_blocks\.\d+\."
SDXL_W4A4 = re.compile(_SDXL_BLOCK + r"(attn1\.(to_q|to_k|to_v|to_out\.0)|attn2\.(to_q|to_out\.0)|ff\.net\.(0\.proj|2))$")

PATTERNS = {"flux": {"w4a4": FLUX_W4A4, "w4a16": FLUX_W4A16}, "sdxl": {"w4a4": SDXL_W4A4}}


@dataclass(frozen=True)
class Target:
    """A linear layer to quantize: its path in the denoiser, shape, mode and branch rank."""

    path: str
    in_features: int
    out_features: int
    bias: bool
    mode: str  # "w4a4" or "w4a16"
    rank: int


def layer_mode(family: str, path: str) -> str | None:
    for mode, pattern in PATTERNS[family].items():
        if pattern.search(path):
            return mode
    return None


def branch_rank(in_features: int, out_features: int, rank: int) -> int:
    """The SVD branch rank of a layer: the requested rank, at most half the smaller dimension."""
    return max(0, min(rank, min(in_features, out_features) // 2))


def plan_targets(denoiser: nn.Module, family: str, *, group_size: int, rank: int,
                 method: str = "svdquant") -> tuple[list[Target], dict[str, str]]:
    """``(targets, skipped)`` for ``denoiser``: the layers to quantize and, per kept-16-bit target, why."""
    targets, skipped = [], {}
    for path, module in denoiser.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        mode = layer_mode(family, path)
        if mode is None:
            continue
        n_in, n_out = module.in_features, module.out_features
        if n_in % group_size:
            skipped[path] = f"{n_in} input channels do not split into groups of {group_size}"
            continue
        r = branch_rank(n_in, n_out, rank) if (mode == "w4a4" and method == "svdquant") else 0
        targets.append(Target(path, n_in, n_out, module.bias is not None, mode, r))
    return targets, skipped
