"""``Studio(compile=...)``: the compiled denoiser gives the eager image, and mixing changes do not recompile.

The suite compiles with the ``eager`` backend (Dynamo's graph capture, run as captured): the graphs, guards and
recompiles are Dynamo's and the same for every backend, and it captures a tiny denoiser in seconds. Inductor (``compile=True``) needs about two minutes per tiny model on the shared
2-core test machine, so its same-image test runs only with ``STUDIO_SLOW_TESTS=1``.

Recompiles are counted with ``torch._dynamo.utils.counters["stats"]["unique_graphs"]``: across weight changes,
switch's one-hot steps, step windows and block weights the count must not move (they are gain tensors of a fixed
shape); composite's larger batch may add one graph.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters

from pipelines.compiled import compile_backend
from pipelines.errors import StudioError
from studio import Studio

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"width": 32, "height": 32, "steps": 3, "seed": 4}
ATOL = 1e-4
BACKEND = "eager"


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def files(family, sdxl_te_loras, sdxl_loras, flux_loras):
    return [sdxl_te_loras[0], sdxl_loras[1]] if family == "sdxl" else flux_loras


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_compiled_same_image_and_bounded_recompiles(family, studio_for, sdxl_te_loras, sdxl_loras, flux_loras):
    torch._dynamo.reset()
    a, b = files(family, sdxl_te_loras, sdxl_loras, flux_loras)
    eager = studio_for(family)
    compiled = Studio(f"tiny-{family}-random", compile=BACKEND)
    renders = [  # (strategy, stack): weights, a switch, step windows and block weights, then lanes
        ("merge", [f"{a}:0.9", f"{b}:0.7"]),
        ("switch", [f"{a}:0.4", f"{b}:1.2"]),
        ("merge", [{"source": str(a), "weight": 0.8, "start": 0.4, "blocks": "te=0"}, f"{b}:0.6:end=0.5"]),
        ("composite", [f"{a}:0.9", f"{b}:0.7"]),
        ("composite", [f"{a}:0.5", f"{b}:1.1"]),
    ]
    counts = []
    for strategy, stack in renders:
        want = eager.compose("a corgi", stack, strategy, output_type="latent", **SMALL).latents[0]
        got = compiled.compose("a corgi", stack, strategy, output_type="latent", **SMALL).latents[0]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        counts.append(graphs())
    print(f"{family}: unique graphs after each render: {counts}")
    assert counts[0] >= 1  # the denoiser really was compiled
    # every one-lane render (weights, switch, windows, block weights) reuses the first graph ...
    assert counts[2] == counts[0]
    # ... and the lanes' larger batch adds at most one, whatever the weights
    assert counts[-1] == counts[3] <= counts[0] + 1
    # the eager forward comes back
    compiled.compiled.remove()
    assert "forward" not in getattr(compiled.pipe, compiled.family.denoiser).__dict__


def test_compile_setting_is_checked():
    assert compile_backend(False) is None and compile_backend(True) == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"
    for bad in ("fastest", 3):
        with pytest.raises(StudioError, match="compile must be"):
            compile_backend(bad)


@pytest.mark.skipif(os.environ.get("STUDIO_SLOW_TESTS") != "1", reason="inductor compiles for ~2 min on the CPU; "
                    "set STUDIO_SLOW_TESTS=1")
def test_inductor_same_image_as_eager(studio_for, flux_loras):
    stack = [f"{flux_loras[0]}:0.9", f"{flux_loras[1]}:0.7"]
    compiled = Studio("tiny-flux-random", compile=True)
    for strategy in ("merge", "switch"):
        want = studio_for("flux").compose("a corgi", stack, strategy, output_type="latent", **SMALL).latents[0]
        got = compiled.compose("a corgi", stack, strategy, output_type="latent", **SMALL).latents[0]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
