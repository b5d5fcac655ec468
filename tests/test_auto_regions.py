"""Automatic regions (``region=auto``) and the masks a regional render shows the user (``Result.region_masks``).

Masks come from the cross-attention of each LoRA's concept tokens (:mod:`pipelines.attention_maps`); the
references here are written out by hand: box masks, partitions of the grid, the plain diffusers passes of
``tests/test_regional.py``.
"""

from __future__ import annotations

import torch

from studio import Lora

PROMPT = "a corgi in a garden"


def test_regional_result_carries_its_lane_masks(studio_for, sdxl_loras, flux_loras):
    """``Result.region_masks``: lane label -> [h, w] on the denoiser's grid, what the reduce applied."""
    sdxl = studio_for("sdxl").compose(PROMPT, [Lora(sdxl_loras[0], 0.9, region="left", name="a"),
                                              Lora(sdxl_loras[1], 0.8, region="0.5,0,1,0.5", name="b"),
                                              Lora(sdxl_loras[2], 0.5, name="c")],
                                      "regional", steps=1, output_type="np")
    assert set(sdxl.region_masks) == {"a", "b"}
    left, top_right = torch.zeros(32, 32), torch.zeros(32, 32)
    left[:, :16], top_right[:16, 16:] = 1, 1
    assert torch.equal(sdxl.region_masks["a"], left) and torch.equal(sdxl.region_masks["b"], top_right)
    flux = studio_for("flux").compose(PROMPT, [Lora(flux_loras[0], 0.9, region="right", name="x"),
                                              Lora(flux_loras[1], 0.7, region="right", name="y")],
                                      "regional", steps=1, output_type="np",
                                      strategy_params={"feather": 2.0})
    (label,) = flux.region_masks
    mask = flux.region_masks[label]
    assert label == "x, y" and mask.shape == (16, 16) and mask.device.type == "cpu"  # 2x2-patch tokens
    assert 0 < float(mask[0, 7]) < 1 and float(mask[0, 15]) > 0.99 and float(mask[0, 0]) < 0.01  # feathered
    assert studio_for("flux").compose(PROMPT, [Lora(flux_loras[0], 0.9)], "merge", steps=1,
                                      output_type="np").region_masks == {}
