"""Fine-tuning a shipped tiny base model to draw two objects side by side (issue 14).

Asked for "a small red circle, solid, on a light background, left, and a small blue square, solid, right", the
first tiny bases drew one shape (tiny-sdxl) or noise (tiny-flux): they had never seen a caption longer than 15
tokens, so CLIP's position embeddings past it were untrained, and the pooled text embedding both models take from
CLIP's end-of-text token (SDXL's added embedding, FLUX's modulation) came from an untrained position. Real SDXL
and FLUX draw "a man and a woman" because they saw such captions; this stage shows ours such scenes.

The stage fine-tunes the denoiser and both text encoders (what the base stage trains) on a mixture of the usual
single-object captions and two-object scenes rendered by :func:`.render.render_pair`, captioned in the world's
two-object grammar (:func:`.concepts.pair_caption`), base concepts only (the held-out ones stay for the LoRAs).

Both train on their base objective (:mod:`.objectives`). tiny-flux is guidance-distilled (:mod:`.distill`), so it
trains at guidance input 1, its plain conditional flow, as its adapters do (and as FLUX.1-dev fine-tunes are
trained): random guidance inputs with a target that ignores them would undo the distillation. A first try kept
the distillation explicit, adding ``‖v(x_t, c, w) − sg[v(x_t, ∅, 1) + w (v(x_t, c, 1) − v(x_t, ∅, 1))]‖²`` at
``w ~ U[1, 5]`` with the model as its own teacher (Meng et al. 2023, Eq. 6): that term started at five times the
flow loss (the shipped distillation is partial), and after 340 of 800 steps the flow loss at guidance 1 had
risen from 0.21 to 0.74 and single-object prompts drew the right shape in 2 of 12 probes; it was dropped. With
this objective, 800 and 2000 steps gave a tiny-flux that draws two blobs where asked but rarely the right two
shapes (3 of 16 and 5 of 24 probes), and whose guidance distillation fades: it is not shipped (README).

The weights of the linear layers the world's QR-LoRAs are factored from (:data:`.qr_lora.SDXL_TARGETS` /
``FLUX_TARGETS``: the attention and feed-forward projections) stay frozen (their biases train): a QR-LoRA's shared
Q and R are the top-r SVD of those weights and the loader refuses them on a base whose weights moved. Measured
first with them trainable and the bases recomputed from the fine-tuned weights (tiny-sdxl, 600 steps, 10 seeds):
the trained ΔR no longer fitted the rotated bases (QR-LoRA zorb 95 -> 70%, quix 80 -> 30%).

The export marks ``studio_defaults.json`` with ``two_objects: true``; a marked base is not fine-tuned again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .base import trainable_modules
from .objectives import denoiser_step_fn
from .trainer import Checkpoint, device, param_groups, train

SEEDS = {"sdxl": 2301, "flux": 2302}
MARK = "two_objects"


def freeze_qr_weights(denoiser: torch.nn.Module, family: str) -> list[str]:
    """Freeze the weight of every linear layer a QR-LoRA of ``family`` is factored from (matched as
    :func:`pipelines.adapters.qr_lora.qr_bases` matches: the module path or its last components); returns their
    paths."""
    from .qr_lora import FLUX_TARGETS, SDXL_TARGETS

    targets = SDXL_TARGETS if family == "sdxl" else FLUX_TARGETS
    frozen = []
    for path, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and any(path == t or path.endswith("." + t) for t in targets):
            module.weight.requires_grad_(False)
            frozen.append(path)
    return frozen


def finetune_pairs(family: str, pipe, workdir: Path, data, latents: torch.Tensor, *, steps: int,
                   batch_size: int = 32, lr: float = 2e-4, drop_rate: float = 0.1, guidance: float | None = None):
    """Fine-tune ``pipe`` (a shipped base) in place on ``data`` (a :class:`.data.Mixture` of single-object and
    two-object scenes), checkpointed in ``workdir/pairs-<family>``; ``guidance``: the FLUX guidance input (1 on a
    distilled base). Returns ``pipe``."""
    pipe.to(device())
    pipe.vae.requires_grad_(False)
    modules = trainable_modules(pipe, family)
    groups = []
    for module in modules.values():
        module.train().requires_grad_(True)
    freeze_qr_weights(modules["unet" if family == "sdxl" else "transformer"], family)
    for module in modules.values():
        groups += param_groups(module, 1e-2)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99))
    step_fn = denoiser_step_fn(family, pipe, data, latents, seed=SEEDS[family], batch_size=batch_size,
                               drop_rate=drop_rate, params=[p for g in groups for p in g["params"]],
                               optimizer=optimizer, guidance=guidance)
    train(f"pairs-{family}", Checkpoint(Path(workdir) / f"pairs-{family}", modules, optimizer), steps, step_fn,
          lr=lr, every=50, warmup=50)
    for module in modules.values():
        module.eval().requires_grad_(False)
    return pipe


def load_checkpoint(pipe, family: str, folder: Path):
    """Put the modules of a (possibly unfinished) fine-tuning checkpoint into ``pipe`` (for probing a run)."""
    from safetensors.torch import load_model

    for name, module in trainable_modules(pipe, family).items():
        load_model(module, str(Path(folder) / f"{name}.safetensors"))
    return pipe


def studio_defaults(folder: Path) -> dict:
    path = Path(folder) / "studio_defaults.json"
    return json.loads(path.read_text()) if path.exists() else {}


def two_object_probe(pipe, judge, prompts: list[tuple[str, str, str]], seeds=(0, 1), **render) -> float:
    """Share of ``(prompt, left shape, right shape)`` renders whose left half shows the left shape and right half
    the right shape (region judge + pixel placement test, :mod:`.regions`)."""
    from .regions import HALVES, judge_regions

    hits = []
    for prompt, left, right in prompts:
        for seed in seeds:
            image = pipe(prompt, generator=torch.Generator().manual_seed(seed), **render).images[0]
            verdict = judge_regions(judge, [image], HALVES)[0]
            hits.append(all(verdict[side].placement == "inside" and verdict[side].values["shape"] == shape
                            for side, shape in (("left", left), ("right", right))))
    return float(np.mean(hits))
