"""The tiny world: renderer, data, resumable training, the build end to end, the benchmark's bookkeeping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from studio.world import composlora
from studio.world.concepts import ATTRIBUTES, BASE, HELD_OUT, SceneSampler, held_out
from studio.world.data import render_set
from studio.world.render import render
from studio.world.trainer import Checkpoint, train


def test_held_out_concepts_stay_out_of_the_base_pool():
    assert {c.category for c in HELD_OUT} == {"subject", "style", "background"}
    assert sum(c.category == "subject" for c in HELD_OUT) >= 2
    for concept in HELD_OUT:
        assert concept.value in ATTRIBUTES[concept.attribute]
        assert concept.value not in BASE[concept.attribute]


def test_renderer_is_seeded_and_draws_what_the_caption_says():
    scene = SceneSampler(fixed={"shape": "zorb", "background": "bricks"}).sample(np.random.default_rng(0))
    a, b = render(scene, np.random.default_rng(5)), render(scene, np.random.default_rng(5))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert "zorb" in scene.caption() and "bricks background" in scene.caption()
    other = render(SceneSampler(fixed={"shape": "zorb", "background": "light"}).sample(np.random.default_rng(0)),
                   np.random.default_rng(5))
    assert np.abs(a - other).mean() > 0.02  # the background changes the picture


def test_data_batches_depend_on_seed_and_step_only():
    data = render_set(SceneSampler(), 40, seed=3)
    again = render_set(SceneSampler(), 40, seed=3)
    assert np.array_equal(data.images, again.images)
    x1, captions1, _ = data.batch(8, seed=1, step=7)
    x2, captions2, _ = again.batch(8, seed=1, step=7)
    assert torch.equal(x1, x2) and captions1 == captions2
    assert x1.shape == (8, 3, 64, 64) and -1 <= float(x1.min()) and float(x1.max()) <= 1
    assert not torch.equal(x1, data.batch(8, seed=1, step=8)[0])


def _toy_training(folder, total, stop_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step_fn(step):
        if stop_at is not None and step == stop_at:
            raise KeyboardInterrupt  # the session ends mid-run
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    try:
        train("toy", Checkpoint(folder, {"m": model}, optimizer), total, step_fn, lr=0.1, every=4, warmup=2)
    except KeyboardInterrupt:
        pass
    return model


def test_an_interrupted_training_resumes_to_the_same_weights(tmp_path):
    straight = _toy_training(tmp_path / "a", 12)
    _toy_training(tmp_path / "b", 12, stop_at=10)  # checkpoint at step 8, steps 8-9 are lost
    assert not (tmp_path / "b" / "DONE").exists()
    resumed = _toy_training(tmp_path / "b", 12)
    assert (tmp_path / "b" / "DONE").exists()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_the_whole_build_runs_and_its_products_load(tmp_path):
    """Every stage at a tiny step count: the assets it writes load with the stock tools and the studio."""
    from studio import Studio
    from studio.world.build import BuildConfig, run
    from studio.world.judge import load_judge

    assets = tmp_path / "assets"
    config = BuildConfig(workdir=tmp_path / "work", assets=assets, scale=0.001)
    run(["data", "vae", "judge", "clip", "base-sdxl", "loras-sdxl"], config, ("subject-zorb",))
    assert [p.name for p in (assets / "loras" / "tiny-sdxl").iterdir()] == ["subject-zorb.safetensors"]
    run(["loras-sdxl", "qr-sdxl"], config)  # the rest; the zorb LoRA is not trained again
    folder = assets / "models" / "tiny-sdxl"
    assert (folder / "model_index.json").exists() and (folder / "studio_defaults.json").exists()
    loras = sorted(p.name for p in (assets / "loras" / "tiny-sdxl").glob("*.safetensors"))
    assert loras == sorted(f"{c.name}.safetensors" for c in HELD_OUT)
    qr_folder = assets / "qr-loras" / "tiny-sdxl"  # ΔR-only adapters and the family's one bases file
    assert sorted(p.name for p in qr_folder.glob("*.safetensors")) == sorted(
        [f"{c.name}.safetensors" for c in HELD_OUT] + ["qr-bases.safetensors"])
    assert all(k.endswith(".lora.delta_r.weight") for k in load_file(str(qr_folder / "style-striped.safetensors")))
    run(["shira-sdxl"], config, ("subject-zorb",))  # PEFT's SHiRA tuner: values float16, indices int16
    shira = load_file(str(assets / "shira-loras" / "tiny-sdxl" / "subject-zorb.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in shira} == {"shira_weight", "shira_indices"}
    assert {v.dtype for v in shira.values()} == {torch.float16, torch.int16} and all(k.startswith("unet.") for k in shira)
    judge = load_judge(assets / "judges" / "concept-judge")
    assert set(judge.predict([np.zeros((64, 64, 3), np.uint8)])[0]) == set(ATTRIBUTES)
    from studio.scoring import ClipScorer

    scorer = ClipScorer(str(assets / "models" / "tiny-clip"), device="cpu")
    from PIL import Image

    blank = Image.new("RGB", (64, 64))
    assert len(scorer.score_many([blank], [["a zorb", "striped"]])[0]) == 2
    studio = Studio(str(folder))
    lora = assets / "loras" / "tiny-sdxl" / "style-striped.safetensors"  # LyCORIS LoHa, written by lycoris
    image = studio.compose("a large red zorb, striped", [str(lora)], "merge", steps=2, seed=0).image
    assert image.size == (64, 64)
    shira_file = assets / "shira-loras" / "tiny-sdxl" / "subject-zorb.safetensors"
    assert studio.compose("a large red zorb", [str(shira_file)], "merge", steps=2, seed=0).image.size == (64, 64)


def test_flux_guidance_distillation_stage(tmp_path):
    """distill-flux fine-tunes the exported transformer once, marks the export, and adapters then train at
    guidance 1; a fresh build folder reuses the shipped VAE instead of training another."""
    from diffusers import FluxTransformer2DModel

    from studio.world.build import BuildConfig, World, run

    assets = tmp_path / "assets"
    config = BuildConfig(workdir=tmp_path / "work", assets=assets, scale=0.001)
    run(["data", "vae", "base-flux"], config)
    folder = assets / "models" / "tiny-flux"
    world = World(config)
    assert not world.guidance_distilled("flux") and world.adapter_guidance("flux") is None
    before = FluxTransformer2DModel.from_pretrained(str(folder / "transformer")).state_dict()
    run(["distill-flux"], config)
    assert world.guidance_distilled("flux") and world.adapter_guidance("flux") == 1.0
    after = FluxTransformer2DModel.from_pretrained(str(folder / "transformer")).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "work" / "distill-flux" / "DONE").exists()
    stamp = (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    run(["distill-flux"], config)  # already distilled: nothing is trained or written again
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp

    fresh = World(BuildConfig(workdir=tmp_path / "fresh", assets=assets, scale=0.001))
    shipped = fresh.vae()
    assert not (tmp_path / "fresh" / "vae").exists()
    assert shipped.config.scaling_factor == pytest.approx(
        json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"])


def test_the_distillation_target_is_classifier_free_guidance():
    """The teacher's two velocities combine as Meng et al. Eq. 6: w = 1 is the conditional one, w = 0 the
    unconditional one."""
    from studio.world.distill import guided_velocity

    v_cond, v_uncond = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    w = torch.tensor([1.0, 0.0])
    out = guided_velocity(v_cond, v_uncond, w)
    torch.testing.assert_close(out[0], v_cond[0])
    torch.testing.assert_close(out[1], v_uncond[1])
    torch.testing.assert_close(guided_velocity(v_cond, v_uncond, torch.tensor([3.5, 2.0]))[1],
                               v_uncond[1] + 2.0 * (v_cond[1] - v_uncond[1]))


def test_tiny_sdxl_trains_for_zero_terminal_snr_with_velocity_targets(tmp_path):
    """Lin et al. 2024: the world's SDXL schedule reaches SNR 0 at its last step (sampling starts from pure noise,
    as in training) and the UNet predicts v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0, computed here directly."""
    from studio.world import tokenizer
    from studio.world.models import world_sdxl
    from studio.world.objectives import SIZE_IDS, noise_scheduler_for, scale_latents, sdxl_loss
    from studio.world.evaluate import ASSETS
    from studio.world.vae import load_shipped_vae

    tokenizer.write(tmp_path / "tok")
    pipe = world_sdxl(load_shipped_vae(ASSETS / "models" / "tiny-sdxl" / "vae"), tmp_path / "tok")
    sched = noise_scheduler_for("sdxl", pipe)
    assert pipe.scheduler.config.prediction_type == sched.config.prediction_type == "v_prediction"
    assert float(sched.alphas_cumprod[-1]) < 1e-6 and pipe.scheduler.config.timestep_spacing == "trailing"
    pipe.scheduler.set_timesteps(25)
    assert int(pipe.scheduler.timesteps[0]) == 999  # the first sampling step is the pure-noise one

    raw = torch.randn(2, 4, 16, 16)
    captions = ["a large red circle, solid, on a dark background, left", ""]
    with torch.no_grad():
        loss = sdxl_loss(pipe, raw, captions, torch.Generator().manual_seed(3), sched)
        gen = torch.Generator().manual_seed(3)
        x0 = scale_latents("sdxl", pipe.vae, raw)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (2,), generator=gen)
        ab = sched.alphas_cumprod[t].view(2, 1, 1, 1)
        embeds, _, pooled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
        keep = torch.tensor([1.0, 0.0])
        pred = pipe.unet(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, encoder_hidden_states=embeds * keep.view(2, 1, 1),
                         added_cond_kwargs={"text_embeds": pooled * keep.view(2, 1),
                                            "time_ids": torch.tensor([SIZE_IDS] * 2, dtype=torch.float32)}).sample
        expected = (pred - (ab.sqrt() * noise - (1 - ab).sqrt() * x0)).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_the_ddpm_target_follows_the_prediction_type():
    from diffusers import DDPMScheduler

    from pipelines.errors import StudioError
    from pipelines.families import ddpm_target

    x0, noise, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.tensor([10, 900])
    assert ddpm_target(DDPMScheduler(), x0, noise, t) is noise
    assert ddpm_target(DDPMScheduler(prediction_type="sample"), x0, noise, t) is x0
    with pytest.raises(StudioError, match="prediction_type 'flow'"):
        ddpm_target(DDPMScheduler(prediction_type="flow"), x0, noise, t)


def test_lora_steps_scale_with_the_concept_category():
    from studio.world.build import BuildConfig

    config = BuildConfig()
    assert (config.steps("lora", "subject"), config.steps("lora", "style"), config.steps("lora", "background")) == (
        config.lora_steps, 3 * config.lora_steps, 2 * config.lora_steps)
    assert config.steps("lora", "subject", "flux") == 6 * config.lora_steps  # a family-specific factor
    assert config.steps("lora", "style", "sdxl") == 6 * config.lora_steps
    assert config.steps("lora", "style", "sdxl", "style-dotted") == 6 * config.lora_steps
    own = BuildConfig(lora_steps_factor={**config.lora_steps_factor, "sdxl/style-striped": 10.0})
    assert own.steps("lora", "style", "sdxl", "style-striped") == 10 * config.lora_steps  # one concept's own
    assert own.steps("lora", "style", "sdxl", "style-dotted") == 6 * config.lora_steps
    assert config.steps("qr", "style", "flux") == 6 * config.qr_steps
    assert config.steps("qr", "background", "flux") == 2 * config.qr_steps
    assert config.steps("vae") == config.vae_steps and BuildConfig(scale=0.001).steps("lora", "style") == 10
    assert config.steps("shira", "subject", "flux") == 2 * config.shira_steps  # its own factor table
    assert config.steps("shira", "style", "sdxl") == config.shira_steps


def test_composlora_mini_has_every_2_and_3_lora_composition():
    comps = composlora.compositions()
    assert len(comps) == 16 and len({c.concepts for c in comps}) == 16
    assert sum(len(c.concepts) == 2 for c in comps) == 8
    for c in comps:
        categories = [held_out(n).category for n in c.concepts]
        assert categories[0] == "subject" and len(set(categories)) == len(categories)


def test_composlora_summary_counts_success_only_when_every_concept_is_seen():
    def record(strategy, detected, clip, seconds):
        return {"item": {"strategy": strategy, "concepts": dict.fromkeys(detected, "x")},
                "detected": detected, "scores": {"clip": clip, "concepts": {k: clip / 2 for k in detected}},
                "timings": {"render_s": seconds}}

    judged = [record("merge", {"subject-zorb": True, "style-striped": True}, 30.0, 1.0),
              record("merge", {"subject-zorb": True, "style-striped": False}, 20.0, 3.0),
              record("composite", {"subject-quix": True, "background-waves": True, "style-dotted": True}, 25.0, 4.0)]
    scores = {s.label: s for s in composlora.summarise(judged)}
    assert scores["merge"].success == 0.5 and scores["composite"].success == 1.0
    assert scores["merge"].per_category == {"style": 0.5, "subject": 1.0}
    assert scores["merge"].clip == (25.0, 5.0) and scores["merge"].seconds == 2.0
    assert scores["merge"].concept_clip == pytest.approx(12.5)
    table = composlora.markdown_table(list(scores.values()))
    assert "| composite | 1 | 100% |" in table and "2.00x" in table
