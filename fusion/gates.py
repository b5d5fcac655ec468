"""AutoLoRA's fine-grained gates (Li et al. 2025, "AutoLoRA: Automatic LoRA Retrieval and Fine-Grained Gated
Fusion for Text-to-Image Generation", arXiv 2508.02107, Sec. 3.3), one per LoRA'd linear layer of the denoiser.

For a linear layer with base output ``h_base = W x + b`` and the active LoRAs' own outputs
``o_i = w_i · s_i · B_i A_i x`` (``w_i`` the LoRA's weight, ``s_i`` its alpha/rank), the gate mixes per token and
output channel:

    g_i = σ( LN(o_i) ⊙ w_lora + (LN(h_base) ⊙ LN(o_i)) ⊙ w_cross + b + W_t φ(t) )
    h   = h_base + Σ_i w_out ⊙ g_i ⊙ o_i

``LN`` is a layer norm over channels without affine parameters; ``w_lora, w_cross, b, w_out`` are vectors over
the layer's output channels, shared by all LoRAs (so a gate judges each LoRA by its output, as in the paper),
and ``w_out`` starts at 0.512 as in the released code (``w_lora = w_cross = b = 0``, so an untrained gate is
``0.256 ×`` merge). ``φ(t)`` is a sinusoidal embedding (diffusers' ``get_timestep_embedding``) of the noise
level ``t ∈ [0, 1]`` the seam publishes as ``MixState.timestep``, and ``W_t`` (zero-initialised) lets the gate
change with the denoising step. The released code passes the timestep to the gate but its forward ignores it;
here it is used. Gates see the low-rank, dense, bias and DoRA parts of each LoRA as that LoRA's output; layers
that are convolutions or belong to a text encoder stay ungated.

Gates are trained per stack by ``studio train-gates`` (:mod:`studio.train_gates`) and saved as safetensors
beside the stack: :func:`gates_path` names the file from the model and the LoRA files' hashes (order-free,
since the gate parameters are shared by the LoRAs), so the ``gated`` strategy finds it for the same stack.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adapters.not_adapters import GATES_FORMAT
from pipelines.composed import ComposedLinear
from pipelines.quant.linear import QuantLinear
from pipelines.errors import StudioError

TIME_DIM = 8
W_OUT_INIT = 0.512
FORMAT = GATES_FORMAT  # the library recognises gates files by it and lists them as no LoRA
_PARAMS = ("w_lora", "w_cross", "bias", "w_out", "w_time")


def timestep_features(t: torch.Tensor, dim: int = TIME_DIM) -> torch.Tensor:
    """``φ(t)``: sinusoidal features of the noise level ``t ∈ [0, 1]`` (diffusers' timestep embedding of 1000·t)."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(t.float().reshape(-1) * 1000.0, dim, flip_sin_to_cos=True, downscale_freq_shift=0)


class AutoLoraGate(nn.Module):
    """The gate of one linear layer with ``features`` output channels (see the module docstring)."""

    def __init__(self, features: int, state, time_dim: int = TIME_DIM, shared: dict | None = None):
        super().__init__()
        self.w_lora = nn.Parameter(torch.zeros(features))
        self.w_cross = nn.Parameter(torch.zeros(features))
        self.bias = nn.Parameter(torch.zeros(features))
        self.w_out = nn.Parameter(torch.full((features,), W_OUT_INIT))
        self.w_time = nn.Parameter(torch.zeros(features, time_dim))
        self.state = state  # the MixState publishing the timestep (not a module)
        self.shared = {} if shared is None else shared  # φ(t) computed once per denoiser call for all gates
        self.eps = 1e-5

    def time_features(self, t: torch.Tensor, device, dtype) -> torch.Tensor:
        key = (t, device, dtype)
        cached = self.shared.get("phi")
        if cached is None or cached[0][0] is not t or cached[0][1:] != key[1:]:
            cached = (key, timestep_features(t.to(device), self.w_time.shape[1]).to(dtype))
            self.shared["phi"] = cached
        return cached[1]

    def gate_values(self, base: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """``g_i`` for every adapter: ``[K, *base.shape]``."""
        t = self.state.timestep
        if t is None:
            raise RuntimeError("learned gates need the denoiser's timestep (MixState.timestep); render through "
                               "the studio's seam or set it before calling the denoiser")
        d = base.shape[-1]
        dtype = base.dtype
        ln_o = F.layer_norm(outputs, (d,), eps=self.eps)
        ln_h = F.layer_norm(base, (d,), eps=self.eps)
        phi = self.time_features(t, base.device, dtype)  # [G, T]
        shift = self.bias.to(dtype) + phi @ self.w_time.to(dtype).T  # [G, d]
        shift = shift.view(shift.shape[0], *[1] * (base.dim() - 2), d)
        return torch.sigmoid(ln_o * self.w_lora.to(dtype) + ln_h * ln_o * self.w_cross.to(dtype) + shift)

    def forward(self, x: torch.Tensor, base: torch.Tensor, outputs: torch.Tensor, columns) -> torch.Tensor:
        """The layer's total change ``Σ_i w_out ⊙ g_i ⊙ o_i`` (the composed layer adds ``h_base``)."""
        gates = self.gate_values(base, outputs)
        return (self.w_out.to(base.dtype) * gates * outputs).sum(0)


def gated_layer_keys(composer, names: Iterable[str]) -> list[str]:
    """Denoiser linear layers touched by any of ``names``, in model order."""
    prefix = composer.family.denoiser + "."
    wanted = set()
    for name in names:
        wanted.update(k for k in composer.adapters[name].layer_keys if k.startswith(prefix))
    linear = (ComposedLinear, QuantLinear)  # a 4-bit layer hosts the same branch (its own segment stays ungated)
    return [k for k, layer in composer.layers.items() if k in wanted and isinstance(layer, linear)]


class GateSet(nn.Module):
    """One :class:`AutoLoraGate` per gated layer of a stack; attaches to and detaches from a composer."""

    def __init__(self, layer_features: dict[str, int], state, time_dim: int = TIME_DIM):
        super().__init__()
        self.keys = list(layer_features)
        shared: dict = {}
        self.gates = nn.ModuleList(AutoLoraGate(f, state, time_dim, shared) for f in layer_features.values())
        self._attached: list = []

    @classmethod
    def for_stack(cls, composer, names: Iterable[str]) -> "GateSet":
        keys = gated_layer_keys(composer, names)
        if not keys:
            raise StudioError("no LoRA of this stack touches a linear layer of the denoiser; nothing to gate")
        return cls({k: composer.layers[k].out_features for k in keys}, composer.state)

    def items(self):
        return zip(self.keys, self.gates)

    def attach(self, composer) -> None:
        self.detach()
        for key, gate in self.items():
            layer = composer.layers.get(key)
            if layer is None:
                raise StudioError(f"gates were trained for layer '{key}', which no LoRA of this stack touches")
            layer.studio_branch.set_gate(gate)
            self._attached.append(layer.studio_branch)

    def detach(self) -> None:
        for branch in self._attached:
            branch.set_gate(None)
        self._attached = []

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: str | Path, metadata: dict[str, str]) -> Path:
        """Write the gates atomically, with the umask's mode."""
        from pipelines.atomic_files import save_safetensors

        path = Path(path)
        tensors = {f"{key}.{p}": getattr(gate, p).detach().float().cpu().contiguous()
                   for key, gate in self.items() for p in _PARAMS}
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_safetensors(tensors, path, {"format": FORMAT, "version": "1", **metadata})

    @classmethod
    def load(cls, path: str | Path, composer, names: Iterable[str]) -> "GateSet":
        """Gates from ``path`` for the stack ``names`` (checked against the file's layers and shapes)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, RuntimeError, ValueError) as e:
            raise StudioError(f"{path}: cannot read gates ({e})") from None
        if metadata.get("format") != FORMAT:
            raise StudioError(f"{path}: not a gates file written by `studio train-gates`")
        keys = [k[: -len(".w_out")] for k in tensors if k.endswith(".w_out")]
        if not keys or any(f"{k}.{p}" not in tensors for k in keys for p in _PARAMS):
            raise StudioError(f"{path}: incomplete gates file (every layer needs {', '.join(_PARAMS)})")
        missing = [k for k in keys if k not in composer.layers]
        if missing:
            raise StudioError(f"{path}: gates for {len(missing)} layer(s) no LoRA of this stack touches "
                              f"(e.g. '{missing[0]}'); were they trained for another stack or model?")
        time_dim = tensors[f"{keys[0]}.w_time"].shape[1]
        gates = cls({k: tensors[f"{k}.w_out"].numel() for k in keys}, composer.state, time_dim)
        for key, gate in gates.items():
            if tensors[f"{key}.w_out"].numel() != composer.layers[key].out_features:
                raise StudioError(f"{path}: gate of '{key}' has {tensors[f'{key}.w_out'].numel()} channels, "
                                  f"the layer {composer.layers[key].out_features}")
            for p in _PARAMS:
                getattr(gate, p).data.copy_(tensors[f"{key}.{p}"])
        gates.metadata = metadata
        return gates


def stack_digest(model: str, hashes: Iterable[str | None]) -> str:
    hashes = list(hashes)
    if any(h is None for h in hashes):
        raise StudioError("gates can be named only for LoRAs loaded from files (in-memory LoRAs have no hash)")
    return hashlib.sha256("\n".join([model, *sorted(hashes)]).encode("utf-8")).hexdigest()[:16]


def gates_path(sources: list[str], model: str, hashes: Iterable[str | None]) -> Path:
    """``<folder of the first LoRA file>/studio-gates-<digest of model + LoRA hashes>.safetensors``."""
    if not sources:
        raise StudioError("an empty stack has no gates")
    return Path(sources[0]).expanduser().resolve().parent / f"studio-gates-{stack_digest(model, hashes)}.safetensors"


def stack_metadata(model: str, family: str, names: list[str], sources: list[str], hashes: list[str | None],
                   **extra) -> dict[str, str]:
    loras = [{"name": n, "file": Path(s).name, "sha256": h} for n, s, h in zip(names, sources, hashes)]
    return {"model": model, "family": family, "loras": json.dumps(loras), "digest": stack_digest(model, hashes),
            **{k: str(v) for k, v in extra.items()}}
