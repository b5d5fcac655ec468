"""Training the world's concepts as QR-LoRA adapters (Yang et al., ICCV 2025), for the ``qr`` merge.

For every targeted linear layer the base weight gives a frozen basis (top-r SVD, then QR: ``s·Q R = W_r``, see
:mod:`pipelines.adapters.kinds.qr`); only ``ΔR`` (r x in, initialised to zero) trains, in the layer
``W x + s·Q ΔR x``, which equals the paper's ``W_res x + s·Q (R + ΔR) x``. All concepts of one family share the
same Q and R (same base, rank and precision), which is what makes their ΔR mergeable. The "triu" variant of the
paper is not used (full ΔR). Saved in the studio's QR-LoRA file format (:func:`save_qr_lora`), in float16, with
the shared Q and R written once per family as the bases file :data:`BASES_FILE` next to the adapters (each
adapter holds only its ΔR: a third of a self-contained file).

The bases are computed once per family and kept in the build folder (:func:`family_bases`): an SVD is not
bit-reproducible across thread counts or machines (near-equal singular values can even rotate their vectors), and
the merge requires every adapter of a family to carry the very same Q and R.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pipelines.adapters.qr_lora import qr_bases, save_qr_bases, save_qr_lora
from pipelines.families import FAMILIES

from .concepts import HELD_OUT, HeldOut
from .data import DataSet
from .objectives import denoiser_step_fn
from .trainer import Checkpoint, device, train

RANK = 16
BASES_FILE = "qr-bases.safetensors"
SDXL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "proj_mlp", "proj_out")


class DeltaR(nn.Module):
    """The trainable ΔR of every layer (frozen Q, R kept as plain tensors)."""

    def __init__(self, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.keys = list(bases)
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(r, device=device())) for _, r in bases.values()])
        self.q = [q.to(device()) for q, _ in bases.values()]


def attach(pipe, family: str, delta: DeltaR) -> list:
    """Forward hooks adding ``Q ΔR x`` to each layer (s = 1: alpha = rank, as the released code)."""
    denoiser = getattr(pipe, FAMILIES[family].denoiser)
    handles = []
    for key, q, d in zip(delta.keys, delta.q, delta.delta):
        module = denoiser.get_submodule(key.split(".", 1)[1])
        handles.append(module.register_forward_hook(lambda m, inp, out, q=q, d=d: out + F.linear(F.linear(inp[0], d), q)))
    return handles


def family_bases(pipe, family: str, workdir: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every QR-LoRA of ``family`` uses these Q, R (computed on first use, then read from ``workdir``)."""
    path = Path(workdir) / f"qr-bases-{family}.safetensors"
    if not path.exists():
        targets = SDXL_TARGETS if family == "sdxl" else FLUX_TARGETS
        bases = qr_bases(pipe, FAMILIES[family], RANK, targets=targets)
        tensors = {f"{k}.{part}": t.detach().float().cpu().contiguous()
                   for k, (q, r) in bases.items() for part, t in (("q", q), ("r", r))}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path.with_suffix(".tmp")), metadata={"layers": json.dumps(list(bases))})
        path.with_suffix(".tmp").replace(path)
    with safe_open(str(path), "pt") as f:  # layer order = the order ΔR parameters are checkpointed in
        return {k: (f.get_tensor(f"{k}.q"), f.get_tensor(f"{k}.r")) for k in json.loads(f.metadata()["layers"])}


def train_qr_lora(family: str, concept: HeldOut, pipe, data: DataSet, latents: torch.Tensor, workdir: Path,
                  out: Path, *, steps: int, batch_size: int = 32, lr: float = 2e-3,
                  guidance: float | None = None) -> Path:
    seed = 7000 + 10 * [c.name for c in HELD_OUT].index(concept.name) + (0 if family == "sdxl" else 1)
    pipe.to(device())
    for p in pipe.components.values():
        if isinstance(p, nn.Module):
            p.requires_grad_(False)
    bases = family_bases(pipe, family, workdir)
    delta = DeltaR(bases)
    handles = attach(pipe, family, delta)
    optimizer = torch.optim.AdamW(delta.parameters(), lr=lr, weight_decay=0.0)

    step_fn = denoiser_step_fn(family, pipe, data, latents, seed=seed, batch_size=batch_size, drop_rate=0.05,
                               params=delta.parameters(), optimizer=optimizer, guidance=guidance)

    try:
        train(f"qr-{family}-{concept.name}", Checkpoint(workdir / f"qr-{family}-{concept.name}", {"delta": delta},
                                                        optimizer), steps, step_fn, lr=lr, every=200, warmup=50)
    finally:
        for handle in handles:
            handle.remove()
    delta_r = {k: d.detach().cpu().clone() for k, d in zip(delta.keys, delta.delta)}
    save_qr_bases(out.parent / BASES_FILE, bases, base_model=f"tiny-{family}", dtype=torch.float16)
    save_qr_lora(str(out), bases, delta_r, variant="full", base_model=f"tiny-{family}", dtype=torch.float16,
                 bases_file=BASES_FILE)
    return out
