"""Build the tiny world's assets from nothing: data, VAE, judges, base models, LoRAs, QR-LoRAs, SHiRAs.

    python -m studio.world.build                 # every stage, resuming whatever is already done
    python -m studio.world.build --stage base-sdxl --workdir .world-build

Every stage is seeded and checkpoints as it goes (a stopped build resumes where it stopped); finished stages are
skipped. Trained weights are written to ``assets/`` at the end of their stage. ``--scale`` multiplies all step
counts (e.g. 0.05 for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .concepts import ATTRIBUTES, BASE, HELD_OUT, SceneSampler
from .data import DataSet, Mixture, cached_pairs, cached_set

from .layout import BUILD_ASSETS as ASSETS
from .layout import DEFAULT_STAGES, STAGES, WORKDIR


@dataclass
class BuildConfig:
    workdir: Path = WORKDIR
    assets: Path = ASSETS
    scale: float = 1.0
    vae_steps: int = 2000
    judge_steps: int = 1500
    clip_steps: int = 800
    base_steps: int = 3000
    distill_steps: int = 1500
    # two-object fine-tuning of a shipped base (issue 14, :mod:`.pairs`)
    pairs_sdxl_steps: int = 1200
    pairs_flux_steps: int = 800  # tiny-flux: tried at 800 and 2000 steps, not shipped (README, "Two objects")
    lora_steps: int = 400
    qr_steps: int = 200
    shira_steps: int = 200  # x shira_steps_factor (see studio.world.shira)
    # LoRA (and QR-LoRA) steps = lora_steps x a factor per concept category, "<family>/<category>" first. Measured
    # with the judge (LoRA alone, 20 seeds): at 400 steps the SDXL texture LoRAs drew their texture in only 25-30%
    # of seeds and the FLUX subject LoRAs their shape in 40-60%.
    # Doubling the SDXL styles again (6x) took dotted from 55% to 85%, and the FLUX quix LoRA from 55% to 70%.
    # A "<family>/<concept>" key comes first (none is set: the striped LoHa needed a larger dim, not more steps;
    # see loras.NETWORK_DIM).
    lora_steps_factor: dict[str, float] = field(default_factory=lambda: {"subject": 1.0, "style": 3.0,
                                                                         "background": 2.0, "sdxl/style": 6.0,
                                                                         "flux/subject": 6.0, "flux/style": 6.0})
    # SHiRA steps: half the LoRAs' base count, and only FLUX's subjects doubled (the LoRAs' 6x), so that both
    # families' twelve adapters trained within one session on the shared, busy 2-core CPU (0.4-0.6 steps/s per
    # process there); the "shira_loras" alone scores in metrics.json were measured at these counts.
    shira_steps_factor: dict[str, float] = field(default_factory=lambda: {"flux/subject": 2.0})

    def steps(self, name: str, category: str | None = None, family: str | None = None,
              concept: str | None = None) -> int:
        keys = (f"{family}/{concept}", f"{family}/{category}", category) if category else ()
        table = getattr(self, f"{name}_steps_factor", self.lora_steps_factor)
        factor = next((table[k] for k in keys if k in table), 1.0)
        return max(10, int(getattr(self, f"{name}_steps") * factor * self.scale))


class World:
    """Lazily built stages of the world; each returns its product and caches it on disk."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.work = Path(config.workdir)
        self._vae = None

    # ------------------------------------------------------------------------------------------------ data
    def data(self, name: str) -> DataSet:
        n = lambda count: max(256, int(count * min(1.0, self.config.scale * 4)))  # noqa: E731
        if name == "all":
            return cached_set(self.work / "data" / "all.npz", SceneSampler(pool=dict(ATTRIBUTES)), n(30000), 11)
        if name == "eval":
            return cached_set(self.work / "data" / "eval.npz", SceneSampler(pool=dict(ATTRIBUTES)), n(2000), 12)
        if name == "base":
            return cached_set(self.work / "data" / "base.npz", SceneSampler(pool=dict(BASE)), n(40000), 13)
        if name == "singles":  # the single-object half of the two-object fine-tuning's mixture
            return cached_set(self.work / "data" / "singles.npz", SceneSampler(pool=dict(BASE)), n(12000), 15)
        if name == "pairs":
            return cached_pairs(self.work / "data" / "pairs.npz", n(12000), 14)
        for i, concept in enumerate(HELD_OUT):
            if name == concept.name:
                sampler = SceneSampler(pool=dict(BASE), fixed={concept.attribute: concept.value})
                return cached_set(self.work / "data" / f"{name}.npz", sampler, n(3000), 100 + i)
        raise KeyError(name)

    # ------------------------------------------------------------------------------------------------- vae
    def vae(self):
        """The world's codec. When this build folder has no VAE of its own but shipped base models exist, it is
        theirs (the latents they were trained on): a fresh clone can retrain a LoRA without retraining the world."""
        if self._vae is None:
            from .vae import load_shipped_vae, train_vae

            models = self.config.assets / "models"
            shipped = [vae for vae in (models / "tiny-sdxl" / "vae", models / "tiny-flux" / "vae") if vae.is_dir()]
            if not (self.work / "vae" / "state.pt").exists() and shipped:
                self._vae = load_shipped_vae(shipped[0])
            else:
                self._vae = train_vae(self.work, self.data("all"), steps=self.config.steps("vae"))
            for p in self._vae.parameters():
                p.requires_grad_(False)
        return self._vae


    # ------------------------------------------------------------------------------------------- tokenizer
    def tokenizer_dir(self) -> Path:
        from . import tokenizer

        folder = self.work / "tokenizer"
        if not (folder / "vocab.json").exists():
            tokenizer.write(folder)
        return folder

    def latents(self, name: str) -> torch.Tensor:
        from .base import encode_latents

        path = self.work / "latents" / f"{name}.pt"
        if path.exists():
            return torch.load(path, weights_only=True)
        latents = encode_latents(self.vae(), self.data(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(latents, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        return latents

    # -------------------------------------------------------------------------------------------- judges
    def judge(self):
        from .judge import save_judge, train_judge

        judge = train_judge(self.work, self.data("all"), self.vae(), steps=self.config.steps("judge"))
        save_judge(judge, self.config.assets / "judges" / "concept-judge")
        return judge

    def clip(self):
        from . import tokenizer
        from .clip import save_clip, train_clip

        tok = tokenizer.clip_tokenizer(self.tokenizer_dir())
        model = train_clip(self.work, self.data("all"), self.vae(), tok, steps=self.config.steps("clip"))
        save_clip(model, tok, self.config.assets / "models" / "tiny-clip")
        return model

    # ---------------------------------------------------------------------------------------- base models
    def base(self, family: str):
        from .base import export_pipeline, train_base

        pipe = train_base(family, self.work, self.vae(), self.tokenizer_dir(), self.data("base"),
                          self.latents("base"), steps=self.config.steps("base"))
        export_pipeline(pipe, family, self.config.assets / "models" / f"tiny-{family}")
        return pipe

    def distill(self, family: str = "flux"):
        """Guidance-distil the shipped tiny FLUX.1 (:mod:`.distill`), once: the export marks it distilled."""
        from .base import export_pipeline
        from .distill import distill_guidance

        if self.guidance_distilled(family):
            return
        pipe = self.load_base(family)
        distill_guidance(pipe, self.work, self.data("base"), self.latents("base"), steps=self.config.steps("distill"))
        export_pipeline(pipe, family, self.config.assets / "models" / f"tiny-{family}", only="transformer",
                        guidance_distilled=True)

    def pairs(self, family: str):
        """Fine-tune the shipped base of ``family`` on single- and two-object scenes (:mod:`.pairs`), once: the
        export marks it ``two_objects``. Half the stream is two-object scenes, half single-object base scenes."""
        from .base import export_pipeline, trainable_modules
        from .pairs import MARK, finetune_pairs, studio_defaults

        folder = self.config.assets / "models" / f"tiny-{family}"
        defaults = studio_defaults(folder)
        if defaults.get(MARK):
            return
        data = Mixture([self.data("singles"), self.data("pairs")])
        latents = torch.cat([self.latents("singles"), self.latents("pairs")])
        pipe = finetune_pairs(family, self.load_base(family), self.work, data, latents,
                              steps=self.config.steps(f"pairs_{family}"), guidance=self.adapter_guidance(family))
        export_pipeline(pipe, family, folder, only=tuple(trainable_modules(pipe, family)), **defaults, **{MARK: True})

    def guidance_distilled(self, family: str) -> bool:
        defaults = self.config.assets / "models" / f"tiny-{family}" / "studio_defaults.json"
        return defaults.exists() and bool(json.loads(defaults.read_text()).get("guidance_distilled"))

    def adapter_guidance(self, family: str) -> float | None:
        """The FLUX guidance input adapters train with: 1 on a distilled base (its plain conditional flow)."""
        return 1.0 if self.guidance_distilled(family) else None

    def load_base(self, family: str):
        import diffusers

        folder = self.config.assets / "models" / f"tiny-{family}"
        if not (folder / "model_index.json").exists():
            self.base(family)
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # --------------------------------------------------------------------------------------------- LoRAs
    def loras(self, family: str, only: tuple[str, ...] = ()) -> list[Path]:
        from .loras import jobs, train_lora

        out = []
        for job in jobs(family):
            if only and job.name not in only:
                continue
            path = self.config.assets / "loras" / f"tiny-{family}" / f"{job.name}.safetensors"
            marker = self.work / f"lora-{family}-{job.name}" / "EXPORTED"
            if not (path.exists() and marker.exists()):
                train_lora(job, self.load_base(family), self.data(job.name).for_family(family),
                           self.latents(job.name), self.work, path,
                           steps=self.config.steps("lora", job.concept.category, family, job.name),
                           guidance=self.adapter_guidance(family))
                marker.write_text("ok")
            out.append(path)
        return out


    def qr_loras(self, family: str, only: tuple[str, ...] = ()) -> list[Path]:
        """QR-LoRAs (:mod:`.qr_lora`), one per held-out concept."""
        from .qr_lora import train_qr_lora

        return self._adapter_set(family, only, "qr-loras", "qr", train_qr_lora)

    def shiras(self, family: str, only: tuple[str, ...] = ()) -> list[Path]:
        """SHiRA adapters trained by PEFT's SHiRA tuner (:mod:`.shira`), one per held-out concept."""
        from .shira import train_shira

        return self._adapter_set(family, only, "shira-loras", "shira", train_shira)

    def _adapter_set(self, family: str, only: tuple[str, ...], folder: str, kind: str, train) -> list[Path]:
        """Train (or keep, once exported) one adapter of ``kind`` per held-out concept into ``assets/<folder>/``;
        ``kind`` names its step count and step-factor table in :class:`BuildConfig` and its checkpoint folders."""
        out = []
        for concept in HELD_OUT:
            if only and concept.name not in only:
                continue
            path = self.config.assets / folder / f"tiny-{family}" / f"{concept.name}.safetensors"
            marker = self.work / f"{kind}-{family}-{concept.name}" / "EXPORTED"
            if not (path.exists() and marker.exists()):
                train(family, concept, self.load_base(family), self.data(concept.name).for_family(family),
                      self.latents(concept.name), self.work, path,
                      steps=self.config.steps(kind, concept.category, family),
                      guidance=self.adapter_guidance(family))
                marker.write_text("ok")
            out.append(path)
        return out


def run(stages, config: BuildConfig, concepts: tuple[str, ...] = ()) -> None:
    """Run ``stages`` in order; ``concepts`` restricts the LoRA, QR-LoRA and SHiRA stages to those held-out concepts
    (e.g. to retrain one LoRA, or to train two families' LoRAs in parallel processes)."""
    world = World(config)
    for stage in stages:
        t0 = time.time()
        if stage == "data":
            for name in ("all", "eval", "base", "singles", "pairs", *(c.name for c in HELD_OUT)):
                world.data(name)
        elif stage == "vae":
            world.vae()
        elif stage == "judge":
            world.judge()
        elif stage == "clip":
            world.clip()
        elif stage.startswith("base-"):
            world.base(stage.removeprefix("base-"))
        elif stage == "distill-flux":
            world.distill("flux")
        elif stage.startswith("pairs-"):
            world.pairs(stage.removeprefix("pairs-"))
        elif stage.startswith("loras-"):
            world.loras(stage.removeprefix("loras-"), concepts)
        elif stage.startswith("qr-"):
            world.qr_loras(stage.removeprefix("qr-"), concepts)
        elif stage.startswith("shira-"):
            world.shiras(stage.removeprefix("shira-"), concepts)
        print(f"[world] stage {stage} done in {time.time() - t0:.0f} s", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", action="append", choices=STAGES,
                    help="stages to run (default: all but pairs-flux, in order)")
    ap.add_argument("--workdir", type=Path, default=BuildConfig.workdir)
    ap.add_argument("--assets", type=Path, default=ASSETS)
    ap.add_argument("--device", default="cpu", help="where to train: cpu, cuda, cuda:1 ...")
    ap.add_argument("--concept", action="append", choices=[c.name for c in HELD_OUT], default=[],
                    help="only these held-out concepts in the LoRA, QR-LoRA and SHiRA stages (default: all)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (smoke runs)")
    args = ap.parse_args(argv)
    from .trainer import set_device

    set_device(args.device)
    run(args.stage or DEFAULT_STAGES, BuildConfig(workdir=args.workdir, assets=args.assets, scale=args.scale),
        tuple(args.concept))


if __name__ == "__main__":
    main()
