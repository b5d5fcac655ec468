"""The shipped tiny world (``assets/``): every file loads with the stock tools, every strategy composes its LoRAs,
and the judges see what the renderer drew.

Families listed in ``SHIPPED`` have their trained model, LoRAs, QR-LoRAs and SHiRAs in ``assets/`` (``studio world
build``); a family is added here when its weights ship.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.adapters.parse import parse_lora
from pipelines.families import FAMILIES
from studio import Studio
from studio.strategies import REGISTRY
from studio.world.concepts import ATTRIBUTES, HELD_OUT, SceneSampler, trigger_phrase
from studio.world.data import render_set
from studio.world.loras import FORMATS

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = ("sdxl", "flux")
FORMAT_LABELS = {"peft": ("peft", "diffusers"), "kohya": ("kohya",), "loha": ("loha",), "lokr": ("lokr",)}
PROMPT = "a large red zorb, striped, on a light background, center"


@pytest.fixture(scope="module", params=SHIPPED)
def studio(request):
    return Studio(f"tiny-{request.param}")


@pytest.fixture(scope="module")
def renders():
    return render_set(SceneSampler(pool=dict(ATTRIBUTES)), 120, seed=4242)


def test_builtin_names_load_the_trained_weights(studio):
    family = studio.family.name
    folder = ASSETS / "models" / f"tiny-{family}"
    assert (folder / "model_index.json").exists()
    denoiser = getattr(studio.pipe, FAMILIES[family].denoiser)
    shipped = denoiser.from_pretrained(str(folder / FAMILIES[family].denoiser))
    first = next(iter(shipped.state_dict().items()))
    torch.testing.assert_close(denoiser.state_dict()[first[0]], first[1].to(torch.float32))
    assert studio.pipe.tokenizer("zorb striped bricks").input_ids[1:-1] != [studio.pipe.tokenizer.unk_token_id] * 3


def test_all_shipped_assets_stay_within_40_megabytes():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 40e6, f"assets/ holds {total / 1e6:.1f} MB"


def test_every_shipped_lora_parses_with_its_format_and_metadata(studio):
    family = studio.family.name
    for concept in HELD_OUT:
        path = ASSETS / "loras" / f"tiny-{family}" / f"{concept.name}.safetensors"
        parsed = parse_lora(path, studio.pipe, studio.family)
        assert parsed.deltas and not parsed.skipped
        assert any(label in parsed.info.format for label in FORMAT_LABELS[FORMATS[family][concept.name]]), \
            (concept.name, parsed.info.format)
        assert trigger_phrase(concept, family) in parsed.info.triggers  # class words on tiny-sdxl subjects
        qr = parse_lora(ASSETS / "qr-loras" / f"tiny-{family}" / f"{concept.name}.safetensors", studio.pipe,
                        studio.family)
        assert qr.info.format == "qr-lora" and qr.deltas


def test_studio_demo_writes_the_report_offline(tmp_path):
    """The README's main job (here two strategies, one seed): the ``studio`` CLI in a fresh process, offline."""
    import subprocess

    from batch_support import cli_env, studio_cli

    out = tmp_path / "demo"
    args = studio_cli("demo", "--out", str(out), "-s", "merge", "-s", "composite", "--seed", "0")
    result = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in (out / "manifest.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 6  # 3 compositions x 2 strategies x 1 seed
    assert len(list((out / "images").rglob("*.png"))) == 6
    report = (out / "report.html").read_text()
    assert "composite" in report and "zorb" in report


def shira_files(family: str) -> list[Path]:
    return [ASSETS / "shira-loras" / f"tiny-{family}" / f"{c.name}.safetensors" for c in HELD_OUT]


def test_every_shipped_shira_is_pefts_sparse_layout_with_its_trigger(studio):
    """Written by PEFT's SHiRA tuner at r = 1: r·(m+n) distinct entries per layer (1-3% of the tiny layers), values
    in float16 and indices in int16 (compact storage), trigger metadata as the other world LoRAs."""
    from safetensors import safe_open

    from studio.world.shira import RANK

    family = studio.family.name
    trained = total = 0
    for concept, path in zip(HELD_OUT, shira_files(family)):
        parsed = parse_lora(path, studio.pipe, studio.family)
        assert parsed.info.format == "shira" and not parsed.skipped
        assert trigger_phrase(concept, family) in parsed.info.triggers
        with safe_open(str(path), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16", "I16"}, dtypes
        for key, delta in parsed.deltas.items():
            rows, cols = delta.sparse_shape
            assert delta.sparse_values.numel() == RANK * (rows + cols), key  # distinct pairs (coalescing kept all)
            trained += delta.sparse_values.numel()
            total += rows * cols
    assert 0.01 <= trained / total <= 0.02, trained / total  # the paper's 1-2% of the targeted weights


def test_the_library_lists_the_shipped_shiras():
    from studio.library import scan

    infos, errors = scan(ASSETS / "shira-loras")
    assert not errors and len(infos) == 2 * len(HELD_OUT)
    assert {i.format for i in infos} == {"shira"} and {i.base for i in infos} == {"sdxl", "flux"}


def test_a_shipped_shira_renders_as_pefts_own_shira_layers(studio):
    """The third-party reference: PEFT's SHiRA layers on a fresh copy of the shipped denoiser, the file loaded by
    PEFT's own ``set_peft_model_state_dict`` (int16 indices and float16 values included)."""
    from conftest import flux_inputs, unet_inputs
    from peft import ShiraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from studio.world.shira import LINEAR_TARGETS, RANK

    family = studio.family.name
    name = FAMILIES[family].denoiser
    path = shira_files(family)[2]
    reference = getattr(studio.pipe, name).from_pretrained(str(ASSETS / "models" / f"tiny-{family}" / name))
    inject_adapter_in_model(ShiraConfig(r=RANK, target_modules=LINEAR_TARGETS[family]), reference)
    state = {k.removeprefix(f"{name}."): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(reference, state)
    assert not result.unexpected_keys
    inputs = unet_inputs() if family == "sdxl" else flux_inputs()
    names = studio.load([path])
    try:
        studio.composer.state.set_active(names)
        studio.composer.state.set_gains(denoiser=torch.ones(1, 1))
        with torch.no_grad():
            ours = getattr(studio.pipe, name)(**inputs).sample
            theirs = reference(**inputs).sample
            plain = reference.__class__.from_pretrained(str(ASSETS / "models" / f"tiny-{family}" / name))(**inputs).sample
    finally:
        studio.unload()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert (theirs - plain).abs().mean() > 1e-3  # the adapter changes the output


def test_the_shipped_shiras_have_distinct_random_supports(studio):
    """Each concept's SHiRA has its own random mask: two supports share about the density (~1.6%) of their entries
    by chance, far from the 100% of a shared mask (what fusing SHiRAs by a sparse sum relies on)."""
    from pipelines.adapters.kinds.shira import support_overlap

    family = studio.family.name
    parsed = [parse_lora(p, studio.pipe, studio.family).deltas for p in shira_files(family)]
    for i, a in enumerate(parsed):
        for b in parsed[i + 1:]:
            shared = smaller = 0
            for key in a.keys() & b.keys():
                n, _ = support_overlap(a[key].sparse_indices, b[key].sparse_indices, a[key].sparse_shape[1])
                shared += n
                smaller += min(a[key].sparse_values.numel(), b[key].sparse_values.numel())
            assert smaller and shared / smaller < 0.05, shared / smaller


ADAPTER_FOLDERS = {"[qr-lora]": "qr-loras", "[shira]": "shira-loras"}


@pytest.mark.parametrize("strategy", [*sorted(REGISTRY), "qr[qr-lora]", "merge[shira]", "composite[shira]"])
def test_every_strategy_composes_the_world_loras(studio, strategy):
    family = studio.family.name
    names = ["subject-zorb", "style-striped"] if strategy == "klora" else ["subject-zorb", "style-striped",
                                                                        "background-bricks"]
    suffix = next((s for s in ADAPTER_FOLDERS if strategy.endswith(s)), None)
    folder = ADAPTER_FOLDERS.get(suffix, "loras")
    strategy = strategy.removesuffix(suffix or "")
    loras = [str(ASSETS / folder / f"tiny-{family}" / f"{n}.safetensors") for n in names]
    base = np.asarray(studio.compose(PROMPT, [], "merge", steps=4, seed=0).image, dtype=np.float32)
    image = np.asarray(studio.compose(PROMPT, loras, strategy, steps=4, seed=0).image, dtype=np.float32)
    assert image.shape == base.shape and np.abs(image - base).mean() > 1.0


def test_both_base_models_place_the_shape_where_the_caption_says(studio):
    """The position word is the last and hardest one (the first tiny-sdxl drew it at chance, 33%): the same seed
    and caption with left / center / right must land where asked, as the judge reads it."""
    from studio.world.judge import load_judge

    judge = load_judge(ASSETS / "judges" / "concept-judge")
    positions = ("left", "center", "right")
    prompts = [f"a small blue triangle, solid, on a light background, {p}" for p in positions]
    images = [studio.compose(prompt, seed=seed).image for seed in (0, 1) for prompt in prompts]
    assert [p["position"] for p in judge.predict(images)] == list(positions) * 2


def test_the_judge_reads_fresh_renders(renders):
    from studio.world.judge import accuracy, load_judge

    scores = accuracy(load_judge(ASSETS / "judges" / "concept-judge"), renders)
    assert min(scores.values()) >= 0.9, scores


def test_the_tiny_clip_prefers_the_true_caption(renders):
    from studio.scoring import ClipScorer, default_clip_model

    assert default_clip_model(["tiny-sdxl"]) == "tiny-clip"
    scorer = ClipScorer("tiny-clip", device="cpu")
    images = [Image.fromarray(im) for im in renders.images[:40]]
    wins = 0
    for i, image in enumerate(images):
        scene = renders.scene(i)
        wrong_shape = next(s for s in ATTRIBUTES["shape"] if s != scene.shape)
        true, wrong = scorer.score_many([image], [[scene.caption(), scene.caption().replace(scene.shape, wrong_shape)]])[0]
        wins += true > wrong
    assert wins >= 0.8 * len(images)


def _distillation_errors(pipe, w: float = 3.5, n: int = 8):
    """Relative errors of tiny-flux's one-pass guided velocity at ``w``, against classifier-free guidance
    computed from its own unguided predictions (w = 1, the plain conditional and empty-prompt velocities)."""
    from studio.world.concepts import BASE
    from studio.world.distill import guided_velocity
    from studio.world.objectives import flux_encode, flux_noised

    data = render_set(SceneSampler(pool=dict(BASE)), n, seed=77)
    images, captions, _ = data.take(np.arange(n))
    gen = torch.Generator().manual_seed(0)

    def velocity(packed, sigma, img_ids, texts, scale):
        embeds, pooled, text_ids = flux_encode(pipe, texts, "cpu")
        return pipe.transformer(hidden_states=packed, timestep=sigma, guidance=torch.full((n,), scale),
                                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                                img_ids=img_ids).sample

    with torch.no_grad():
        packed, _, sigma, img_ids = flux_noised(pipe, pipe.vae.encode(images).latent_dist.mean, gen)
        v_cond = velocity(packed, sigma, img_ids, captions, 1.0)
        v_uncond = velocity(packed, sigma, img_ids, [""] * n, 1.0)
        guided = velocity(packed, sigma, img_ids, captions, w)
        reference = guided_velocity(v_cond, v_uncond, torch.full((n,), w))
    scale = (reference - v_cond).norm()  # how far guidance moves the prediction
    return float((guided - reference).norm() / scale), float((guided - v_cond).norm() / scale)


def test_tiny_flux_is_guidance_distilled():
    """Like FLUX.1-dev, tiny-flux takes the guidance scale as an input: one forward at w = 3.5 moves towards the
    two-pass CFG prediction (Meng et al. 2023, Eq. 6). Measured on the shipped model: 0.73 of CFG's move left as
    error, the prediction moved 0.44 of the way; the undistilled model measured 1.00 and 0.02."""
    pipe = Studio("tiny-flux").pipe
    to_cfg, moved = _distillation_errors(pipe)
    assert to_cfg < 0.85 and moved > 0.3, (to_cfg, moved)
