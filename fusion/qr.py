"""QR merge (``qr``): QR-LoRA's merge (Yang et al., ICCV 2025, "QR-LoRA: Efficient and Disentangled Fine-tuning
via QR Decomposition for Customized Generation", method section) and an orthogonal merge for ordinary LoRAs built on it.

**QR-LoRA adapters** (see :mod:`pipelines.adapters.kinds.qr`) share a frozen basis Q, R computed from the base
weight; each trains only ΔR_i. The paper merges them once, with no inference cost:

    W' = W_res + s·Q (R + Σ_i λ_i ΔR_i) = W + s·Q Σ_i λ_i ΔR_i          (λ_i = the LoRA weights; paper: 0.9-1)

so the merge here is one rank-r adapter (up = Q, down = s Σ λ_i ΔR_i) on every layer: the same cost as a
single LoRA, and the base weights are never written (unloading restores them bit for bit). Adapters made with
different Q (another base, rank or precision) are refused, as the paper requires one shared basis.

**Ordinary LoRAs** have no shared basis, so one is built per layer from the B factors: block QR of
``[B_1 | … | B_N]`` (block Gram–Schmidt with re-orthogonalisation; each block's new directions are
orthonormalised by SVD so that directions already spanned are dropped), giving Q = [Q_1 | … | Q_N] with
span(Q_1..Q_i) = span(B_1..B_i). Every update is exactly ``ΔW_i = Q C_i`` with coefficients
``C_i = Qᵀ B_i A_i`` (the analogue of ΔR_i), and the merge is ``W + Q Σ_i w_i C_i'``:

* ``mode="sum"``: C_i' = C_i — exactly ``merge``, in a basis of rank rank([B_1..B_N]) ≤ Σ r_i;
* ``mode="orthogonal"``: in each segment Q_s the coefficient blocks C_i[s] of the LoRAs are made mutually
  orthogonal by Gram–Schmidt in stack order (C_j[s] loses its component along the earlier LoRAs' blocks), so
  the updates become exactly orthogonal (cos = 0) while every LoRA keeps whatever does not overlap: the part of
  a later LoRA that writes into an earlier LoRA's output directions *with the same input pattern* is what is
  removed. Stack order is priority order, as in LoRA Switch (put the subject first). The result does not depend
  on the choice of basis inside a segment. For two LoRAs it is, per layer, w_1 ΔW_1 + w_2 (ΔW_2 − c ΔW_1) with
  c = ⟨ΔW_2, ΔW_1⟩ / ‖ΔW_1‖²; with more, each later LoRA is orthogonalised separately inside each earlier
  LoRA's new output directions (one projection coefficient per segment instead of one per update).
* ``mode="auto"`` (default): the paper's sum on layers where every LoRA is a QR-LoRA, orthogonal elsewhere.

Interference is the cosine between the flattened updates, cos(ΔW_i, ΔW_j) = ⟨C_i, C_j⟩ / (‖C_i‖‖C_j‖) (Q is
orthonormal, so it equals the cosine of the dense updates; the paper's similarity analysis measures the same
between ΔR matrices).
``info["qr"]`` reports, per pair of LoRAs, the mean and largest |cos| over the layers both touch, before and
after the merge, and the share of each LoRA's squared norm that the merge kept. Dense and DoRA parts, which have
no B factor, are added as a weighted sum and left out of the interference figures.

The released code stores W_res in a separate file computed in float16; the studio uses W + s·QΣλΔR, which is
the same in exact arithmetic and avoids that rounding. The released merge script also takes Q and R from the
first file only, without checking that the other file's match.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import torch

from pipelines.adapters.delta import LayerDelta
from pipelines.errors import StrategyError

from .base import Param
from .weightspace import LayerPart, WeightMerge, split_parts

BASIS_TOLERANCE = 1e-4  # new directions below this fraction of a block's largest singular value are dropped
ZERO_BLOCK = 1e-5  # coefficient blocks below this fraction of a segment's largest block are numerical zeros


def shared_basis(ups: list[torch.Tensor]) -> tuple[torch.Tensor, list[slice]]:
    """Block QR of ``[B_1 | … | B_N]``: orthonormal Q and the slice of its columns each block added."""
    out_features = ups[0].shape[0]
    q = ups[0].new_zeros(out_features, 0)
    segments = []
    for b in ups:
        x = b.float()
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            x = x - q @ (q.T @ x)
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        reference = torch.linalg.matrix_norm(b.float(), ord=2)
        new = u[:, s > BASIS_TOLERANCE * reference]
        segments.append(slice(q.shape[1], q.shape[1] + new.shape[1]))
        q = torch.cat([q, new], dim=1)
    return q, segments


def orthogonalize(coeffs: list[torch.Tensor], segments: list[slice]) -> list[torch.Tensor]:
    """Gram–Schmidt of the coefficient blocks ``C_i[s]`` in stack order, separately in every segment ``s``."""
    out = [c.clone() for c in coeffs]
    for seg in segments:
        if seg.stop == seg.start:
            continue
        largest = max(float(c[seg].norm()) for c in out)
        done: list[torch.Tensor] = []
        for c in out:
            x = c[seg]
            if float(x.norm()) <= ZERO_BLOCK * largest:
                x.zero_()  # exactly zero in exact arithmetic (block-triangular structure)
                continue
            for _ in range(2):
                for y in done:
                    x -= (x * y).sum() / (y * y).sum() * y
            if float(x.norm()) > ZERO_BLOCK * largest:
                done.append(x)
    return out


def cosines(coeffs: list[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosines of the flattened coefficient matrices (= of the updates Q C_i)."""
    flat = torch.stack([c.flatten() for c in coeffs]).double()
    norms = flat.norm(dim=1)
    denominator = norms[:, None] * norms[None, :]
    # an update that is zero on this layer (an untrained LoRA module) has cosine 0 with everything, not 0/0
    return torch.where(denominator > 0, (flat @ flat.T) / denominator.clamp_min(1e-300), 0.0).float()


class QRMerge(WeightMerge):
    name = "qr"
    summary = "QR-LoRA merge W + Q·Σλ·ΔR for QR-LoRA adapters; orthogonal merge in a shared QR basis otherwise"
    citation = "Yang et al., ICCV 2025, QR-LoRA: Efficient and Disentangled Fine-tuning via QR Decomposition"
    params = (
        Param("mode", "auto", "'auto' (the paper's sum for QR-LoRA adapters, orthogonal otherwise), 'sum' or "
              "'orthogonal' (stack order = priority)", type=str, choices=("auto", "sum", "orthogonal")),
    )

    # ----------------------------------------------------------------------------------------- statistics
    def begin_merge(self, names: list[str]) -> None:
        self._pairs = defaultdict(lambda: {"before": [], "after": []})
        self._norms = defaultdict(lambda: [0.0, 0.0])
        self._modes = defaultdict(int)

    def _record(self, parts: list[LayerPart], before: list[torch.Tensor], after: list[torch.Tensor], mode: str):
        self._modes[mode] += 1
        names = [p.name for p in parts]
        for name, c0, c1 in zip(names, before, after):
            self._norms[name][0] += float(c0.pow(2).sum())
            self._norms[name][1] += float(c1.pow(2).sum())
        if len(parts) < 2:
            return
        cos0, cos1 = cosines(before), cosines(after)
        for i, j in itertools.combinations(range(len(parts)), 2):
            self._pairs[(names[i], names[j])]["before"].append(abs(float(cos0[i, j])))
            self._pairs[(names[i], names[j])]["after"].append(abs(float(cos1[i, j])))

    def end_merge(self, names: list[str]) -> dict:
        pairs = []
        for (a, b), v in self._pairs.items():
            n = len(v["before"])
            pairs.append({"pair": [a, b], "layers": n,
                          "mean_abs_cos_before": sum(v["before"]) / n, "mean_abs_cos_after": sum(v["after"]) / n,
                          "max_abs_cos_before": max(v["before"]), "max_abs_cos_after": max(v["after"])})
        retained = {n: (v[1] / v[0] if v[0] > 0 else 1.0) for n, v in self._norms.items()}
        return {"qr": {"layers": dict(self._modes), "interference": pairs, "retained_energy": retained}}

    # ----------------------------------------------------------------------------------------- merge
    def merge_layer(self, key: str, parts: list[LayerPart], base_weight: torch.Tensor) -> LayerDelta | None:
        device = base_weight.device if base_weight.device.type != "meta" else "cpu"
        low, dense, bias = split_parts(parts, base_weight, device)
        low_parts = [p for p in parts if p.is_low_rank]
        all_qr = bool(low_parts) and len(low_parts) == len(parts) and all(p.kind == "qr" for p in parts)
        mode = self.mode if self.mode != "auto" else ("sum" if all_qr else "orthogonal")
        up = down = None
        if low and all_qr and mode == "sum":
            up, down = self._qr_lora_sum(key, low_parts, low)
        elif low:
            q, segments = shared_basis([b for _, b, _ in low])
            coeffs = [(q.T @ b) @ a for _, b, a in low]  # C_i = Qᵀ B_i A_i, so B_i A_i = Q C_i
            merged = orthogonalize(coeffs, segments) if mode == "orthogonal" else coeffs
            self._record(low_parts, coeffs, merged, mode)
            up, down = q, sum(w * c for (w, _, _), c in zip(low, merged))
        if up is not None and up.shape[1] == 0:  # every B factor is zero on this layer: nothing low-rank is left
            up = down = None
        if up is None and dense is None and bias is None:
            return None
        cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
        return LayerDelta(down=cpu(down), up=cpu(up), dense=cpu(dense), bias=cpu(bias), kind="qr")

    def _qr_lora_sum(self, key, parts, low):
        """W_res + s·Q(R + Σ λ_i ΔR_i) − W = Q · Σ λ_i s_i ΔR_i, with one shared Q (the paper's merge)."""
        scales = [b.norm(dim=0).mean() for _, b, _ in low]  # up = s_i Q_i with orthonormal Q_i
        qs = [b / s for (_, b, _), s in zip(low, scales)]
        for p, q in zip(parts[1:], qs[1:]):
            if q.shape != qs[0].shape or not torch.allclose(q, qs[0], atol=1e-4, rtol=0):
                raise StrategyError(
                    f"QR-LoRA adapters '{parts[0].name}' and '{p.name}' were made with different Q on layer {key} "
                    "(another base checkpoint, rank or precision); the QR-LoRA merge needs one shared basis. "
                    "Use --param mode=orthogonal, or the 'merge' or 'cat' strategy")
        delta = sum(w * s * a for (w, _, a), s in zip(low, scales))  # Σ λ_i s_i ΔR_i
        coeffs = [s * a for (_, _, a), s in zip(low, scales)]
        self._record(parts, coeffs, coeffs, "sum")
        return qs[0], delta
