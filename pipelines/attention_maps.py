"""Cross-attention maps from image positions to text tokens, captured while the denoiser runs.

CLoRA (Meral et al., ICCV 2025, arXiv 2403.19776, Sec. 3) and automatic regions read, for each lane, how much
every image position attends to the tokens of a LoRA's concept words. :class:`AttentionCapture` records them
with forward hooks on the attention modules: a hook sees a module's inputs, recomputes the attention
probabilities from them and leaves the module's output alone, so a render with capture on is bit-identical to
one without (tested); hooks are attached for one denoiser call and removed in a ``finally``.

* **SDXL UNet** (``attn2``, the cross-attention of every transformer block): ``softmax(q kᵀ · scale)`` over the
  77 CLIP tokens, averaged over heads and over the layers of one resolution: the coarsest attention level with at
  least 16 cells on the shorter side (SD1.5 at 512² and SDXL at 512²: 16×16; SDXL at 1024²: 32×32, the level
  CLoRA's released SDXL code reads; the random tiny UNet's 32² latents: 16×16), else the finest level there is
  (the trained tiny world's 16² latents: 8×8).
* **FLUX** (the joint attention of the double-stream blocks): the image-token rows' attention over the T5 text
  keys, ``softmax(q_img k_txtᵀ / √d)`` after the blocks' q/k RMS norms and rotary embedding, renormalised over
  the text keys (as SDXL's cross-attention is), averaged over heads and double-stream blocks. The single-stream
  blocks (text and image in one sequence) are not read.

A map is ``[rows, h, w, T]``: one row per sample of the denoiser call (lanes × guidance halves, as the seam
ran them), the attention level's grid (FLUX: the packed 2×2 token grid), ``T`` text tokens. With gradients
enabled the maps keep their graph (CLoRA's latent update differentiates through them).

:func:`concept_token_positions` finds which token positions of a prompt belong to a LoRA's trigger or concept
words, with the tokenizer whose tokens the denoiser's cross-attention reads (CLIP for SDXL, T5 for FLUX).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

__all__ = ["AttentionCapture", "concept_token_positions", "sdxl_attention_factor", "text_tokenizer"]

MIN_CELLS = 16  # the attention level read: the coarsest with at least this many cells on the shorter side


def sdxl_attention_factor(unet: nn.Module, height: int, width: int) -> int:
    """The downsampling factor (latent grid / attention grid) of the UNet level whose cross-attention is read."""
    types = list(getattr(unet.config, "down_block_types", ()))
    factors = [2 ** b for b, kind in enumerate(types) if "CrossAttn" in kind]
    if not factors:
        raise ValueError("this UNet has no cross-attention blocks to read attention maps from")
    fitting = [f for f in factors if min(height, width) // f >= MIN_CELLS and height % f == 0 and width % f == 0]
    return max(fitting) if fitting else min(factors)


def text_tokenizer(pipe, family: str):
    """The tokenizer of the text the denoiser's cross-attention reads: CLIP (SDXL), T5 (``tokenizer_2``, FLUX)."""
    return pipe.tokenizer if family == "sdxl" else pipe.tokenizer_2


def concept_token_positions(tokenizer, prompt: str, words: Sequence[str], max_length: int | None = None) -> list[int]:
    """Token positions (in the padded/truncated sequence the text encoder reads) of every occurrence of ``words``
    in ``prompt``; each word or phrase is tokenized alone and matched as a run of token ids."""
    limit = max_length or getattr(tokenizer, "model_max_length", None) or 512
    ids = tokenizer(prompt, truncation=True, max_length=limit)["input_ids"]
    found: list[int] = []
    for word in words:
        word = word.strip()
        if not word:
            continue
        variants = {tuple(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (word, " " + word)}
        for run in variants:
            if not run:
                continue
            for start in range(len(ids) - len(run) + 1):
                if tuple(ids[start:start + len(run)]) == run:
                    found.extend(range(start, start + len(run)))
    return sorted(set(found))


def _sdxl_probabilities(attn: nn.Module, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``[B, N, T]``: head-averaged ``softmax(q kᵀ · scale)`` of a diffusers ``Attention`` (cross-attention)."""
    if getattr(attn, "norm_cross", None) is not None:
        context = attn.norm_encoder_hidden_states(context)
    if hidden.dim() == 4:  # [B, C, H, W] inputs (not used by SDXL's transformer blocks, handled like the processor)
        hidden = hidden.flatten(2).transpose(1, 2)
    q, k = attn.to_q(hidden), attn.to_k(context)
    heads = attn.heads
    q = q.unflatten(-1, (heads, -1)).transpose(1, 2).float()
    k = k.unflatten(-1, (heads, -1)).transpose(1, 2).float()
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1).mean(1)


def _flux_probabilities(attn: nn.Module, hidden: torch.Tensor, context: torch.Tensor, rotary) -> torch.Tensor:
    """``[B, N, T]``: head-averaged attention of FLUX's image queries over the text keys (renormalised over them)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attn, "fused_projections", False):
        q = attn.to_qkv(hidden).chunk(3, dim=-1)[0]
        k = attn.to_added_qkv(context).chunk(3, dim=-1)[1]
    else:
        q, k = attn.to_q(hidden), attn.add_k_proj(context)
    q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
    k = attn.norm_added_k(k.unflatten(-1, (-1, attn.head_dim)))
    if rotary is not None:  # text positions come first in FLUX's rotary table, then the image tokens
        cos, sin = rotary
        text = context.shape[1]
        q = apply_rotary_emb(q, (cos[text:], sin[text:]), sequence_dim=1)
        k = apply_rotary_emb(k, (cos[:text], sin[:text]), sequence_dim=1)
    logits = torch.einsum("bnhd,bthd->bhnt", q.float(), k.float()) / math.sqrt(attn.head_dim)
    return logits.softmax(-1).mean(1)


class AttentionCapture:
    """Records cross-attention maps of the denoiser calls made inside :meth:`recording`.

    ``family``: ``"sdxl"`` or ``"flux"``; ``grid``: the denoiser's latent grid ``(H, W)`` in latent pixels (FLUX:
    the unpacked latent size, its token grid is ``(H/2, W/2)``). After each call, :attr:`calls` holds one
    ``[rows, h, w, T]`` map (every chunk of lanes the seam ran for that call, in row order).
    """

    def __init__(self, family: str, grid: tuple[int, int]):
        self.family = family
        self.grid = (int(grid[0]), int(grid[1]))
        self.calls: list[torch.Tensor] = []
        self._handles: list = []
        self._per_layer: dict[int, list[torch.Tensor]] = {}
        self.map_grid: tuple[int, int] | None = None

    # ------------------------------------------------------------------------------------------ modules
    def _modules(self, denoiser: nn.Module) -> list[nn.Module]:
        if self.family == "sdxl":
            factor = sdxl_attention_factor(denoiser, *self.grid)
            self.map_grid = (self.grid[0] // factor, self.grid[1] // factor)
            return [m for name, m in denoiser.named_modules() if name.endswith("attn2") and hasattr(m, "to_q")]
        self.map_grid = (self.grid[0] // 2, self.grid[1] // 2)
        return [block.attn for block in getattr(denoiser, "transformer_blocks", ())]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if hidden is None or context is None:
            return
        cells = self.map_grid[0] * self.map_grid[1]
        if self.family == "sdxl":
            if hidden.dim() != 3 or hidden.shape[1] != cells:  # another resolution level
                return
            probs = _sdxl_probabilities(module, hidden, context)
        else:
            probs = _flux_probabilities(module, hidden, context, kwargs.get("image_rotary_emb"))
        self._per_layer.setdefault(id(module), []).append(probs)

    @contextlib.contextmanager
    def recording(self, denoiser: nn.Module) -> Iterator["AttentionCapture"]:
        """Hooks attached for the body (one denoiser call of the seam, all its chunks), removed on any exit."""
        self._per_layer = {}
        try:
            for module in self._modules(denoiser):
                self._handles.append(module.register_forward_hook(self._hook, with_kwargs=True))
            yield self
            self._finish_call()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._per_layer = {}

    def _finish_call(self) -> None:
        layers = list(self._per_layer.values())
        if not layers:
            raise RuntimeError(f"no cross-attention layer ran at the {self.map_grid} attention grid during the call")
        chunks = len(layers[0])
        if any(len(outputs) != chunks for outputs in layers):
            raise RuntimeError("attention layers ran a different number of times in one denoiser call")
        # the c-th output of every layer belongs to chunk c of the seam's lanes: average layers, join chunks
        per_chunk = [torch.stack([outputs[c] for outputs in layers]).mean(0) for c in range(chunks)]
        maps = torch.cat(per_chunk, dim=0)
        self.calls.append(maps.unflatten(1, self.map_grid))

    @property
    def attached(self) -> bool:
        return bool(self._handles)
