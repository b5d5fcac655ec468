"""Memory accounting: bytes of a quantized denoiser vs the same denoiser in 16 bits.

Three independent ways, which must agree:

* **arithmetic** from a published config (``FLUX1_DEV``, ``SDXL_BASE``: the ``transformer/config.json`` of
  FLUX.1-dev and the ``unet/config.json`` of SDXL base 1.0): every parameter of the architecture written
  out by hand (:func:`flux_arithmetic`, :func:`sdxl_arithmetic`), with each quantized layer costed by
  :func:`quant_layer_bytes`;
* **meta**: the real diffusers class built on the ``meta`` device, its targets replaced by
  :class:`QuantLinear` shells, bytes summed over the actual tensors (:func:`meta_bytes`);
* **measured**: the tensors of a quantized model in memory or on disk (:func:`model_bytes`).

Per quantized layer (in → out, 16-bit storage): packed 4-bit weights ``in·out/2``; scales ``out·in/64 · 2``
(INT4) or ``out·in/16 · 1`` + 4 (NVFP4); smoothing ``2·in`` (W4A4); branch ``2·r·(in + out)``; bias ``2·out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .linear import QuantLinear
from .targets import branch_rank, layer_mode

BYTES_16 = 2

# transformer/config.json of black-forest-labs/FLUX.1-dev
FLUX1_DEV = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "guidance_embeds": True,
             "in_channels": 64, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
             "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (the fields that shape parameters)
SDXL_BASE = {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time",
             "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
             "cross_attention_dim": 2048, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D",
                                                               "CrossAttnDownBlock2D"],
             "in_channels": 4, "layers_per_block": 2, "out_channels": 4,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
             "transformer_layers_per_block": [1, 2, 10],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "use_linear_projection": True}


def quant_layer_bytes(n_in: int, n_out: int, *, bias: bool, fmt: str, group: int, rank: int, smooth: bool) -> int:
    """Stored bytes of one :class:`QuantLinear` (see the module doc)."""
    scales = n_out * (n_in // group) * (2 if fmt == "int4" else 1) + (4 if fmt == "nvfp4" else 0)
    return (n_in * n_out // 2 + scales + (BYTES_16 * n_in if smooth else 0) + BYTES_16 * rank * (n_in + n_out)
            + (BYTES_16 * n_out if bias else 0))


@dataclass
class LayerRow:
    """One kind of layer: ``count`` copies of an ``n_in → n_out`` linear and its bytes (one copy)."""

    name: str
    n_in: int
    n_out: int
    count: int
    mode: str | None  # "w4a4", "w4a16", or None for 16-bit
    bytes16: int
    bytes_q: int


@dataclass
class MemoryReport:
    rows: list[LayerRow] = field(default_factory=list)
    rest_params: int = 0  # parameters outside the rows (kept 16-bit)

    @property
    def total16(self) -> int:
        return sum(r.count * r.bytes16 for r in self.rows) + BYTES_16 * self.rest_params

    @property
    def total_q(self) -> int:
        return sum(r.count * r.bytes_q for r in self.rows) + BYTES_16 * self.rest_params

    @property
    def ratio(self) -> float:
        return self.total16 / self.total_q


def _row(family: str, name: str, n_in: int, n_out: int, count: int, *, bias: bool, fmt: str, group: int,
         rank: int, method: str = "svdquant", path: str | None = None) -> LayerRow:
    """``name`` labels the row; ``path`` (default ``name``) is a module path that decides the layer's mode."""
    mode = layer_mode(family, path or name)
    dense = BYTES_16 * (n_in * n_out + (n_out if bias else 0))
    if mode is None or n_in % group:
        return LayerRow(name, n_in, n_out, count, None, dense, dense)
    w4a4 = mode == "w4a4" and method == "svdquant"
    r = branch_rank(n_in, n_out, rank) if w4a4 else 0
    q = quant_layer_bytes(n_in, n_out, bias=bias, fmt=fmt, group=group, rank=r, smooth=w4a4)
    return LayerRow(name, n_in, n_out, count, mode, dense, q)


def flux_arithmetic(config: dict, *, fmt: str = "int4", group: int = 64, rank: int = 32,
                    method: str = "svdquant") -> MemoryReport:
    """Every parameter of ``FluxTransformer2DModel(**config)``, by hand."""
    c = {**FLUX1_DEV, **config}
    d = c["num_attention_heads"] * c["attention_head_dim"]
    hd, mlp = c["attention_head_dim"], 4 * d
    out_ch = c.get("out_channels") or c["in_channels"]
    kw = dict(fmt=fmt, group=group, rank=rank, method=method)
    L, S = c["num_layers"], c["num_single_layers"]
    double = "transformer_blocks.0."
    single = "single_transformer_blocks.0."
    rows = [_row("flux", f"double block: {p}", i, o, L, bias=True, path=double + p, **kw) for p, i, o in [
        ("norm1.linear", d, 6 * d), ("norm1_context.linear", d, 6 * d),
        ("attn.to_q", d, d), ("attn.to_k", d, d), ("attn.to_v", d, d), ("attn.to_out.0", d, d),
        ("attn.add_q_proj", d, d), ("attn.add_k_proj", d, d), ("attn.add_v_proj", d, d), ("attn.to_add_out", d, d),
        ("ff.net.0.proj", d, mlp), ("ff.net.2", mlp, d), ("ff_context.net.0.proj", d, mlp),
        ("ff_context.net.2", mlp, d)]]
    rows += [_row("flux", f"single block: {p}", i, o, S, bias=True, path=single + p, **kw) for p, i, o in [
        ("norm.linear", d, 3 * d), ("attn.to_q", d, d), ("attn.to_k", d, d), ("attn.to_v", d, d),
        ("proj_mlp", d, mlp), ("proj_out", d + mlp, d)]]
    embed = [("time_text_embed.timestep_embedder.linear_1", 256, d), ("time_text_embed.timestep_embedder.linear_2", d, d),
             ("time_text_embed.text_embedder.linear_1", c["pooled_projection_dim"], d),
             ("time_text_embed.text_embedder.linear_2", d, d),
             ("context_embedder", c["joint_attention_dim"], d),
             ("x_embedder", c["in_channels"] * c["patch_size"] ** 2, d),
             ("norm_out.linear", d, 2 * d), ("proj_out", d, c["patch_size"] ** 2 * out_ch)]
    if c["guidance_embeds"]:
        embed += [("time_text_embed.guidance_embedder.linear_1", 256, d),
                  ("time_text_embed.guidance_embedder.linear_2", d, d)]
    rows += [_row("flux", p, i, o, 1, bias=True, **kw) for p, i, o in embed]
    rms_norms = L * 4 * hd + S * 2 * hd  # q/k (and added q/k) RMSNorm weights
    return MemoryReport(rows=rows, rest_params=rms_norms)


def sdxl_arithmetic(config: dict, *, fmt: str = "int4", group: int = 64, rank: int = 32,
                    method: str = "svdquant") -> MemoryReport:
    """Every parameter of ``UNet2DConditionModel(**config)`` for SDXL-style configs, by hand."""
    c = {**SDXL_BASE, **config}
    ch = list(c["block_out_channels"])
    cross = c["cross_attention_dim"]
    tl = list(c["transformer_layers_per_block"])
    lpb = c["layers_per_block"]
    temb = 4 * ch[0]
    kw = dict(fmt=fmt, group=group, rank=rank, method=method)
    counts: dict[tuple[int], int] = {}  # transformer blocks per width
    rest = 0

    def conv(cin, cout, k=3):
        return cin * cout * k * k + cout

    def resnet(cin, cout):
        return 2 * cin + conv(cin, cout) + temb * cout + cout + 2 * cout + conv(cout, cout) + (
            conv(cin, cout, 1) if cin != cout else 0)

    def transformer(d, layers):  # everything but the blocks' linears (counted in rows)
        counts[d] = counts.get(d, 0) + layers
        return 2 * d + 2 * (d * d + d) + layers * 3 * 2 * d  # group norm, proj_in/out, three layer norms

    rest += conv(c["in_channels"], ch[0]) + (ch[0] * temb + temb) + (temb * temb + temb)
    rest += (c["projection_class_embeddings_input_dim"] * temb + temb) + (temb * temb + temb)
    out_ch = ch[0]
    for i, kind in enumerate(c["down_block_types"]):
        in_ch, out_ch = out_ch, ch[i]
        for j in range(lpb):
            rest += resnet(in_ch if j == 0 else out_ch, out_ch)
            if kind.startswith("CrossAttn"):
                rest += transformer(out_ch, tl[i])
        if i < len(ch) - 1:
            rest += conv(out_ch, out_ch)  # downsampler
    rest += 2 * resnet(ch[-1], ch[-1]) + transformer(ch[-1], tl[-1])  # mid block
    rev, rev_tl = ch[::-1], tl[::-1]
    out_ch = rev[0]
    for i, kind in enumerate(c["up_block_types"]):
        prev, out_ch = out_ch, rev[i]
        skip_in = rev[min(i + 1, len(ch) - 1)]
        for j in range(lpb + 1):
            res_in = prev if j == 0 else out_ch
            skip = skip_in if j == lpb else out_ch
            rest += resnet(res_in + skip, out_ch)
            if kind.startswith("CrossAttn"):
                rest += transformer(out_ch, rev_tl[i])
        if i < len(ch) - 1:
            rest += conv(out_ch, out_ch)  # upsampler
    rest += 2 * ch[0] + conv(ch[0], c["out_channels"])
    rows = []
    block = "down_blocks.0.attentions.0.transformer_blocks.0."  # any transformer block: decides the mode
    for d, n in counts.items():
        rows += [_row("sdxl", f"transformer block (width {d}): {p}", i, o, n, bias=b, path=block + p, **kw)
                 for p, i, o, b in [
                     ("attn1.to_q", d, d, False), ("attn1.to_k", d, d, False), ("attn1.to_v", d, d, False),
                     ("attn1.to_out.0", d, d, True), ("attn2.to_q", d, d, False), ("attn2.to_k", cross, d, False),
                     ("attn2.to_v", cross, d, False), ("attn2.to_out.0", d, d, True),
                     ("ff.net.0.proj", d, 8 * d, True), ("ff.net.2", 4 * d, d, True)]]
    return MemoryReport(rows=rows, rest_params=rest)


# -------------------------------------------------------------------------------------------------- meta
def meta_denoiser(config: dict) -> nn.Module:
    """The diffusers class of ``config`` built on the ``meta`` device (no memory)."""
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, config["_class_name"])
    fields = {k: v for k, v in config.items() if not k.startswith("_")}
    with init_empty_weights(include_buffers=True):
        return cls(**fields)


def meta_bytes(denoiser: nn.Module, family: str, *, fmt: str = "int4", group: int = 64, rank: int = 32,
               method: str = "svdquant") -> tuple[int, int, dict[str, tuple[int, int]]]:
    """``(bytes16, bytes_q, {layer: (bytes16, bytes_q)})`` from the tensors of ``denoiser`` (any device).

    Target layers are replaced, on the meta device, by :class:`QuantLinear` shells of the right spec, and the
    bytes of their real buffers are summed; every other parameter counts 2 bytes.
    """
    from .targets import plan_targets

    targets, _ = plan_targets(denoiser, family, group_size=group, rank=rank, method=method)
    per_layer = {}
    quantized_params = 0
    for t in targets:
        shell = QuantLinear(t.in_features, t.out_features, bias=t.bias, fmt=fmt, group_size=group, rank=t.rank,
                            smooth=t.mode == "w4a4" and method == "svdquant", mode=t.mode, device="meta")
        q = sum(v.numel() * v.element_size() for v in shell.state_dict().values())
        n = t.in_features * t.out_features + (t.out_features if t.bias else 0)
        quantized_params += n
        per_layer[t.path] = (BYTES_16 * n, q)
    total_params = sum(p.numel() for p in denoiser.parameters())
    bytes16 = BYTES_16 * total_params
    bytes_q = BYTES_16 * (total_params - quantized_params) + sum(q for _, q in per_layer.values())
    return bytes16, bytes_q, per_layer


def model_bytes(denoiser: nn.Module) -> tuple[int, int]:
    """``(bytes as stored, bytes of the 16-bit original)`` of a (quantized) denoiser in memory.

    Stored: 4-bit buffers as they are, every floating tensor at 16 bits. Original: each :class:`QuantLinear`
    counted as the dense 16-bit linear it replaced.
    """
    stored = original = 0
    quant = {name: m for name, m in denoiser.named_modules() if isinstance(m, QuantLinear)}
    for name, m in quant.items():
        stored += sum(v.numel() * (BYTES_16 if v.is_floating_point() else v.element_size())
                      for v in m.state_dict().values())
        original += BYTES_16 * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))
    for key, value in denoiser.state_dict().items():
        if key.rpartition(".")[0] in quant:
            continue
        stored += BYTES_16 * value.numel()
        original += BYTES_16 * value.numel()
    return stored, original


def summarize(report: MemoryReport) -> list[dict]:
    """Rows grouped for printing: name, shape, count, mode, MiB at 16 bits and quantized, ratio."""
    out = []
    for r in report.rows:
        out.append({"layer": r.name, "shape": f"{r.n_in}->{r.n_out}", "count": r.count, "mode": r.mode or "16-bit",
                    "mib16": r.count * r.bytes16 / 2 ** 20, "mib_q": r.count * r.bytes_q / 2 ** 20,
                    "ratio": r.bytes16 / r.bytes_q})
    out.append({"layer": "everything else (embedders, norms, convs, ...)", "shape": "", "count": 1,
                "mode": "16-bit", "mib16": BYTES_16 * report.rest_params / 2 ** 20,
                "mib_q": BYTES_16 * report.rest_params / 2 ** 20, "ratio": 1.0})
    return out
