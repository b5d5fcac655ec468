"""K-LoRA (Ouyang et al., CVPR 2025, "K-LoRA: Unlocking Training-Free Fusion of Any Subject and Style LoRAs",
method section): per layer and step, apply either the subject or the style LoRA, whichever the top-k rule
picks.

For a layer with ΔW_1 (subject, the first LoRA of the stack) and ΔW_2 (style, the second), ranks r_1, r_2:

    k   = r_1 · r_2
    S_i = sum of the k largest |ΔW_i| entries
    S   = α · t / T + β            (α = 1.5, β = 0.5)
    γ   = mean over layers of Σ|ΔW_1| / Σ|ΔW_2|, after dropping ratios > 3 × their mean
    apply ΔW_1 if S_1 / γ > S_2 · S, else ΔW_2

t runs forward through denoising: t / T = step / steps, 0 at the first step (pure noise) up to (T−1)/T at the
last, so S grows from β to α + β and the subject LoRA wins more layers early (structure), the style LoRA more
late (texture). The released code counts t in *forward calls of LoRA layers* (T = 28000 = 50 steps × 560 SDXL
attention projections), so its S changes inside a step, drifts with the step count, the CFG layout and the
number of images (its global counter is never reset); here t counts denoising steps, as the paper describes.
The released code also ignores LoRA alpha/rank scaling when it forms ΔW = B A and drops every LoRA layer that is
not an attention projection; here ΔW_i is each LoRA's exact delta and the rule applies to every denoiser layer
both LoRAs touch (layers only one touches get that one; text-encoder parts of both are applied, merged).
The choice uses the LoRAs' own deltas (the LoRA weights cancel between S_i and γ); the chosen LoRA is then
applied at its weight. ``pattern="s*"`` is the supplementary material's variant (β = 0.85·α in the released
script, S taken modulo α), which the released README recommends for FLUX.

Implementation: S_1, S_2 and γ are computed once per LoRA pair (cached on the composer); each step sends a
``[layers, 2]`` table of 0/1 multipliers with the plan (``StepPlan.layer_weights``), so one forward with the
usual concatenated branch runs the whole step.
"""

from __future__ import annotations

import torch

from pipelines.errors import StrategyError

from .base import Param, RunContext, StepContext, StepPlan, Strategy


def delta_rank(entry, weight: torch.Tensor) -> int:
    """The rank of a prepared delta: its factor rank when low-rank, else the numerical rank of ΔW."""
    if entry.down is not None and entry.dense is None and entry.dora_out is None and entry.dora_in is None:
        return int(entry.down.shape[0])
    return int(torch.linalg.matrix_rank(entry.weight(weight).flatten(1)))


def topk_sum(delta: torch.Tensor, k: int) -> float:
    """S_i: the sum of the k largest |ΔW_i| entries."""
    flat = delta.abs().flatten()
    return float(torch.topk(flat, min(k, flat.numel())).values.sum())


def trimmed_mean_ratio(ratios: list[float], outlier: float) -> float:
    """γ: the mean of the per-layer ratios after dropping those above ``outlier`` × their mean."""
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < outlier * mean]
    return sum(kept) / len(kept) if kept else mean


class KLora(Strategy):
    name = "klora"
    summary = "per layer and step, the subject or the style LoRA, by a top-k rule with a time-dependent scale"
    citation = "Ouyang et al., CVPR 2025, K-LoRA: Training-Free Fusion of Any Subject and Style LoRAs"
    params = (
        Param("alpha", 1.5, "slope of the time scale S = alpha * t/T + beta (the paper's 1.5)", min=0.0),
        Param("beta", 0.5, "offset of the time scale (the paper's 0.5)", min=0.0),
        Param("pattern", "s", "'s': the paper's scale; 's*': the supplementary variant (S mod alpha)",
              type=str, choices=("s", "s*")),
        Param("outlier", 3.0, "layer ratios above this multiple of their mean are left out of gamma", min=1.0),
    )

    # --------------------------------------------------------------------------------------------- rule
    def scale(self, step: int, num_steps: int) -> float:
        """S = α t/T + β with t/T = step/steps; 's*' takes it modulo α."""
        s = self.alpha * step / max(num_steps, 1) + self.beta
        return s % self.alpha if self.pattern == "s*" and self.alpha > 0 else s

    def subject_wins(self, step: int, num_steps: int) -> torch.Tensor:
        """Per compared layer: True where ΔW_1 (subject) is applied, S_1/γ > S_2·S."""
        return self.s1 / self.gamma > self.s2 * self.scale(step, num_steps)

    # --------------------------------------------------------------------------------------------- protocol
    def prepare(self, run: RunContext) -> None:
        if len(run.names) != 2:
            raise StrategyError(
                f"K-LoRA fuses exactly two LoRAs, a subject LoRA first and a style LoRA second; got {len(run.names)}"
            )
        composer = run.composer
        if composer is None:
            raise StrategyError("strategy 'klora' needs the pipeline's composer")
        names = tuple(run.names)
        key = (names, "klora", tuple(id(composer.adapters[n].parsed) for n in names))
        stats = composer.cache.get(key)
        if stats is None:
            stats = composer.cache[key] = self._layer_stats(composer, names)
        layer_ids, s1, s2, ratios = stats
        if not ratios:
            raise StrategyError(f"'{names[0]}' and '{names[1]}' share no denoiser layer; K-LoRA compares the two "
                                "LoRAs layer by layer")
        self.layer_ids, self.s1, self.s2 = layer_ids, s1, s2
        self.gamma = trimmed_mean_ratio(ratios, self.outlier)
        self.rows = len(composer.state.layer_index)
        share = [float(self.subject_wins(s, run.num_steps).float().mean()) for s in range(run.num_steps)]
        self.info["klora"] = {"gamma": self.gamma, "layers": len(ratios), "subject_share_per_step": share}

    @staticmethod
    def _layer_stats(composer, names):
        ids, s1, s2, ratios = [], [], [], []
        prefix = composer.family.denoiser + "."
        for key, layer in composer.layers.items():
            entries = layer.studio_branch.entries
            if not key.startswith(prefix) or names[0] not in entries or names[1] not in entries:
                continue
            device = layer.weight.device if layer.weight.device.type != "meta" else "cpu"
            e1, e2 = entries[names[0]], entries[names[1]]
            d1, d2 = e1.weight(layer.weight, device), e2.weight(layer.weight, device)
            total1, total2 = float(d1.abs().sum()), float(d2.abs().sum())
            if total1 == 0.0 or total2 == 0.0:
                continue
            k = delta_rank(e1, layer.weight) * delta_rank(e2, layer.weight)
            ids.append(composer.state.layer_id(key))
            s1.append(topk_sum(d1, k))
            s2.append(topk_sum(d2, k))
            ratios.append(total1 / total2)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(s1), torch.tensor(s2), ratios

    def plan(self, ctx: StepContext) -> StepPlan:
        w = ctx.weights
        if w[1] == 0:
            subject = torch.ones(len(self.layer_ids), dtype=torch.bool)  # style outside its step window
        elif w[0] == 0:
            subject = torch.zeros(len(self.layer_ids), dtype=torch.bool)
        else:
            subject = self.subject_wins(ctx.step, ctx.num_steps)
        table = torch.ones(self.rows, 2)
        table[self.layer_ids, 0] = subject.float()
        table[self.layer_ids, 1] = (~subject).float()
        return StepPlan(gains=w[None].clone(), weights=torch.ones(1), text_lanes=[0], layer_weights=table)
