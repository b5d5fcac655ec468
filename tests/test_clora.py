"""The ``clora`` strategy (Meral et al., ICCV 2025) against its formulas and against plain diffusers passes.

* the InfoNCE loss equals the formula written out with Python loops on hand-made maps;
* the latent update equals ``z − α ∇L`` with the gradient taken by hand (autograd through a replay of the step
  with the model input scaled by hand and the loss written out);
* with the masks frozen (no latent update), the image equals plain diffusers/PEFT passes per lane (base lane
  without LoRAs, lane c with LoRA c) averaged in the warm-up step and combined with the masks by hand afterwards;
* with ``masks=every_step`` each step after the warm-up's first uses the masks of the previous step's attention,
  and the image equals the plain passes combined with those per-step masks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fusion.clora import CLoRA, info_nce
from studio import Lora, Studio
from test_regional import masked_reference
from writers import write_state_dict

PROMPT, NEGATIVE = "a corgi and a cat in a garden", "blurry"


def world_prompt(family: str, background: str = "light") -> str:
    """The two-subject prompt as the family's subject LoRAs are called (bound to class words)."""
    from studio.world.concepts import Scene, pair_caption

    return pair_caption(Scene("zorb", "red", "solid", background, "small", "left"),
                        Scene("quix", "blue", "solid", background, "small", "right"), family)


def _formula(embeddings: list[list[float]], groups: list[int], tau: float) -> float:
    """InfoNCE written out: cosine similarities, every ordered positive pair, negatives from other groups."""
    def cos(u, v):
        return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    terms = []
    for a in range(len(embeddings)):
        for p in range(len(embeddings)):
            if p == a or groups[p] != groups[a]:
                continue
            pos = math.exp(cos(embeddings[a], embeddings[p]) / tau)
            neg = sum(math.exp(cos(embeddings[a], embeddings[n]) / tau)
                      for n in range(len(embeddings)) if groups[n] != groups[a])
            terms.append(-math.log(pos / (pos + neg)))
    return sum(terms) / len(terms)


def test_info_nce_equals_the_formula_on_hand_made_maps():
    maps = [[1.0, 0.0, 0.0, 0.2], [0.9, 0.1, 0.0, 0.3], [0.8, 0.2, 0.1, 0.0],  # group 0 (three maps)
            [0.0, 0.1, 1.0, 0.7], [0.1, 0.0, 0.8, 0.9]]  # group 1
    groups = [0, 0, 0, 1, 1]
    for tau in (0.5, 0.1):
        got = info_nce(torch.tensor(maps), torch.tensor(groups), tau)
        assert abs(float(got) - _formula(maps, groups, tau)) < 1e-6
    assert float(info_nce(torch.tensor(maps[:2]), torch.tensor([0, 0]))) == 0.0  # no negatives: nothing to push


def test_clora_loss_groups_base_and_own_lane_token_maps():
    """CLoRA.loss on hand-made captured maps [lanes·rows, h, w, T]: group c = c's token maps in the base lane and
    in lane c (conditional rows of guidance), each min-max normalised, InfoNCE τ = 0.5."""
    strategy = CLoRA()
    strategy.concepts, strategy.positions, strategy.guidance, strategy.temperature = [0, 1], [[2], [4, 5]], True, 0.5
    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(3 * 2, 2, 3, 7, generator=gen)  # 3 lanes x [uncond, cond], 2x3 grid, 7 tokens

    def embedding(lane, token):
        flat = maps[2 * lane + 1, :, :, token].flatten()  # the conditional row
        return ((flat - flat.min()) / (flat.max() - flat.min() + 1e-6)).tolist()

    embeddings = [embedding(0, 2), embedding(1, 2), embedding(0, 4), embedding(0, 5), embedding(2, 4), embedding(2, 5)]
    expected = _formula(embeddings, [0, 0, 1, 1, 1, 1], 0.5)
    assert abs(float(strategy.loss(maps)) - expected) < 1e-6


def _world(family, name):
    from pipelines.assets import assets_root

    return str(assets_root() / "loras" / f"tiny-{family}" / f"{name}.safetensors")


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_latent_update_equals_z_minus_alpha_grad_by_hand(family, monkeypatch):
    """Each update the strategy makes is z − α_t ∇_z L, with the model input (SDXL: z / √(σ²+1), rows doubled for
    guidance; FLUX: t / 1000), the loss and the gradient computed here by hand on the same step."""
    import fusion.clora as clora_module
    from pipelines.attention_maps import AttentionCapture

    studio = Studio(f"tiny-{family}")
    checked = []
    real = clora_module.gradient_step

    def checking(seam, plan, latents, loss_of, step_size):
        new, loss = real(seam, plan, latents, loss_of, step_size)
        scheduler = seam.pipe.scheduler
        t = scheduler.timesteps[scheduler.step_index]
        z = latents.detach().clone().requires_grad_(True)

        def inputs(z):
            if family == "sdxl":
                sigma = scheduler.sigmas[scheduler.step_index]
                return {"sample": torch.cat([z, z]) / (sigma ** 2 + 1) ** 0.5, "timestep": t}
            return {"hidden_states": z, "timestep": torch.full((z.shape[0],), float(t) / 1000)}

        capture = AttentionCapture(family, plan.extras["attention_capture"].grid)
        by_hand = type(plan)(gains=plan.gains, weights=plan.weights, text_lanes=plan.text_lanes,
                             extras={"attention_capture": capture})
        with torch.enable_grad():
            seam.replay(by_hand, **inputs(z))
            strategy = checked_strategy[0]
            hand_loss = strategy.loss(capture.calls[0])
            (grad,) = torch.autograd.grad(hand_loss, z)
        assert abs(float(hand_loss) - loss) < 1e-5
        torch.testing.assert_close(new, latents - step_size * grad, atol=1e-6, rtol=1e-5)
        assert float(grad.abs().max()) > 0
        checked.append(step_size)
        return new, loss

    monkeypatch.setattr(clora_module, "gradient_step", checking)
    strategy = CLoRA(refine_iters=2)
    checked_strategy = [strategy]
    loras = [Lora(_world(family, "subject-zorb"), name="zorb"), Lora(_world(family, "subject-quix"), name="quix")]
    result = studio.compose(world_prompt(family), loras, strategy, steps=6, seed=1, output_type="np")
    # steps 1 and 2 updated (update_until 0.5 of 6 steps), both refinement steps (round(0 or 0.2·6) = 1,
    # round(0.4·6) = 2): 2 + 2 updates, α_t = 20·√(1 − 0.5·i/5)
    assert result.strategy_info["updates"] == {"steps": [1, 2], "iterations": 4} and len(checked) == 4
    assert checked[0] == checked[1] == pytest.approx(20 * math.sqrt(1 - 0.5 * 1 / 5))
    assert checked[3] == pytest.approx(20 * math.sqrt(1 - 0.5 * 2 / 5))
    # params were frozen only during the updates; nothing stays attached
    denoiser = getattr(studio.pipe, studio.family.denoiser)
    assert not any(m._forward_hooks for m in denoiser.modules())


def _with_trigger(path, out, trigger):
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata() or {})
    return write_state_dict(out, tensors, {**metadata, "modelspec.trigger_phrase": trigger})


def _frozen_mask_reference(family, files, masks, *, steps, guidance, seed, warmup):
    """Plain diffusers: lanes (no LoRA; LoRA 0; LoRA 1), each with the prompt encoded under its own adapters;
    warm-up steps average the three predictions, later steps combine them with ``masks`` ([3, h, w] lane weights)."""
    lanes = [([], [], PROMPT, masks[0]), ([0], [1.0], PROMPT, masks[1]), ([1], [1.0], PROMPT, masks[2])]
    return masked_reference(family, files, lanes, steps=steps, guidance=guidance, seed=seed,
                            step_masks=lambda step, lane: 1.0 / len(lanes) if step < warmup else None)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_frozen_mask_fusion_equals_masked_plain_passes(family, tmp_path, sdxl_te_loras, flux_loras):
    files = sdxl_te_loras if family == "sdxl" else flux_loras
    files = [_with_trigger(files[0], tmp_path / "a.safetensors", "corgi"),
             _with_trigger(files[1], tmp_path / "b.safetensors", "cat")]
    guidance = 5.0 if family == "sdxl" else 3.5
    studio = Studio(f"tiny-{family}-random")
    kw = dict(steps=3, seed=2, guidance=guidance, output_type="np", negative_prompt=NEGATIVE if family == "sdxl" else "")
    loras = [Lora(files[0], name="corgi"), Lora(files[1], name="cat")]
    result = studio.compose(PROMPT, loras, "clora", strategy_params={"update_until": 0.0}, **kw)
    masks = torch.stack([result.region_masks["corgi"], result.region_masks["cat"]])
    assert result.strategy_info["updates"] == {"steps": [], "iterations": 0}
    assert set(masks.unique().tolist()) <= {0.0, 1.0} and 0 < float(masks.sum()) < masks[0].numel()
    lanes = torch.cat([(1 - masks.sum(0))[None], masks])
    expected = _frozen_mask_reference(family, files, lanes, steps=3, guidance=guidance, seed=2, warmup=1)
    np.testing.assert_allclose(result.latents[0], expected, atol=2e-4, rtol=0)
    updated = studio.compose(PROMPT, loras, "clora", **kw)  # with the latent updates (step 1 of 3): another image
    assert np.abs(updated.latents[0] - result.latents[0]).max() > 1e-3


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_every_step_masks_come_from_the_previous_steps_attention(family, tmp_path, sdxl_te_loras, flux_loras,
                                                                   monkeypatch):
    """masks=every_step (the paper's per-step masks): warm-up step 0 averages the lanes, step 1 uses the warm-up's
    masks, every later step the masks of the step before's captured attention; the image equals plain
    diffusers/PEFT passes combined with exactly those per-step weights."""
    from fusion.region_masks import auto_masks, lane_weights

    files = sdxl_te_loras if family == "sdxl" else flux_loras
    files = [_with_trigger(files[0], tmp_path / "a.safetensors", "corgi"),
             _with_trigger(files[1], tmp_path / "b.safetensors", "cat")]
    guidance = 5.0 if family == "sdxl" else 3.5
    recorded, real_plan = [], CLoRA.plan

    def spy(self, ctx):
        plan = real_plan(self, ctx)
        recorded.append((self, ctx.step, plan.weights.clone(), plan.extras.get("attention_capture")))
        return plan

    monkeypatch.setattr(CLoRA, "plan", spy)
    studio = Studio(f"tiny-{family}-random")
    kw = dict(steps=4, seed=2, guidance=guidance, output_type="np", negative_prompt=NEGATIVE if family == "sdxl" else "")
    loras = [Lora(files[0], name="corgi"), Lora(files[1], name="cat")]
    params = {"update_until": 0.0, "masks": "every_step", "mask_after": 0.25}
    result = studio.compose(PROMPT, loras, "clora", strategy_params=params, **kw)
    strategy = recorded[0][0]
    assert [step for _, step, _, _ in recorded] == [0, 1, 2, 3] and all(c is not None for *_, c in recorded)
    assert torch.equal(recorded[0][2], torch.full((3,), 1 / 3))  # warm-up: lanes averaged
    shape = recorded[1][2].shape
    for step in (2, 3):  # the masks of the previous step's maps (concept maps tested against diffusers' scores)
        maps = strategy.masker.concept_maps(recorded[step - 1][3]).detach().float().cpu()
        expected = lane_weights(list(auto_masks(maps, strategy.mask_grid, strategy.mask_threshold)))
        torch.testing.assert_close(recorded[step][2], expected.reshape(shape), atol=0, rtol=0)
    assert any(not torch.equal(recorded[step][2], recorded[1][2]) for step in (2, 3))  # the masks moved
    final = torch.stack([result.region_masks["corgi"], result.region_masks["cat"]])
    assert torch.equal(final.flatten(1), recorded[3][2][1:].reshape(2, -1))  # the masks the last step used
    grid = strategy.mask_grid

    def step_masks(step, lane):
        weights = recorded[step][2][lane]
        if weights.dim() == 0:
            return weights
        return weights.reshape(grid)[None, None] if family == "sdxl" else weights.reshape(1, -1, 1)

    unused = torch.ones(grid)  # every step's weight comes from step_masks
    lanes = [([], [], PROMPT, unused), ([0], [1.0], PROMPT, unused), ([1], [1.0], PROMPT, unused)]
    expected = masked_reference(family, files, lanes, steps=4, guidance=guidance, seed=2, step_masks=step_masks)
    np.testing.assert_allclose(result.latents[0], expected, atol=2e-4, rtol=0)


def test_clora_without_a_trigger_in_the_prompt_says_it_rendered_merge(sdxl_loras, studio_for):
    studio = studio_for("sdxl")
    got = studio.compose(PROMPT, [sdxl_loras[0], sdxl_loras[1]], "clora", steps=2, output_type="np")
    assert "rendered as merge" in got.strategy_info["fallback"] and got.region_masks == {}
    merged = studio.compose(PROMPT, [sdxl_loras[0], sdxl_loras[1]], "merge", steps=2, output_type="np")
    np.testing.assert_array_equal(got.latents[0], merged.latents[0])


def test_failing_update_leaves_nothing_attached(monkeypatch):
    """An error inside the latent update (gradients on, capture hooks on, parameters frozen) leaves the denoiser's
    hooks, forward and requires_grad flags as they were."""
    studio = Studio("tiny-flux")
    denoiser = studio.pipe.transformer
    flags = [p.requires_grad for p in denoiser.parameters()]

    def broken(self, call_maps):
        raise RuntimeError("loss failed")

    monkeypatch.setattr(CLoRA, "loss", broken)
    loras = [Lora(_world("flux", "subject-zorb"), name="zorb"), Lora(_world("flux", "subject-quix"), name="quix")]
    with pytest.raises(RuntimeError, match="loss failed"):
        studio.compose(world_prompt("flux"), loras, "clora", steps=4)
    assert not any(m._forward_hooks for m in denoiser.modules()) and "forward" not in denoiser.__dict__
    assert [p.requires_grad for p in denoiser.parameters()] == flags and studio.composer.adapters == {}


def test_out_of_memory_in_the_update_is_named(monkeypatch):
    """An out-of-memory error in the gradient forward becomes the studio's OutOfMemoryError saying what to lower;
    the studio is left as it was."""
    from pipelines.errors import OutOfMemoryError
    from pipelines.seam import DenoiserSeam

    def no_memory(self, plan, **changes):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(DenoiserSeam, "replay", no_memory)
    studio = Studio("tiny-sdxl")
    loras = [Lora(_world("sdxl", "subject-zorb"), name="zorb"), Lora(_world("sdxl", "subject-quix"), name="quix")]
    with pytest.raises(OutOfMemoryError, match="latent update.*max_lanes"):
        studio.compose(world_prompt("sdxl"), loras, "clora", steps=4)
    assert studio.composer.adapters == {} and "forward" not in studio.pipe.unet.__dict__


def test_max_concepts_keeps_a_background_lora_global():
    """A background LoRA whose trigger is in the prompt is a concept (its own lane and mask) unless max_concepts
    limits the concepts to the first LoRAs of the stack; then it acts in every lane."""
    studio = Studio("tiny-sdxl")
    prompt = world_prompt("sdxl", background="waves")
    loras = [Lora(_world("sdxl", "subject-zorb"), name="zorb"), Lora(_world("sdxl", "subject-quix"), name="quix"),
             Lora(_world("sdxl", "background-waves"), name="waves")]
    every = studio.compose(prompt, loras, "clora", steps=2, output_type="np")
    assert every.strategy_info["concepts"] == ["zorb", "quix", "waves"] and set(every.region_masks) == {
        "zorb", "quix", "waves"}
    two = studio.compose(prompt, loras, "clora", strategy_params={"max_concepts": 2}, steps=2, output_type="np")
    assert two.strategy_info["concepts"] == ["zorb", "quix"] and two.strategy_info["global"] == ["waves"]
    assert set(two.region_masks) == {"zorb", "quix"}
