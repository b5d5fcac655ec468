"""The public Python API: :class:`Studio`, :func:`compose` and :class:`Result`.

>>> from studio import Studio
>>> studio = Studio("tiny-sdxl")                       # or a Hub id, a folder, a single .safetensors file
>>> result = studio.compose(
...     "a corgi in a garden, watercolor",
...     loras=["corgi.safetensors:0.9", "watercolor.safetensors:0.7"],
...     strategy="composite", seed=7)
>>> result.save("out/")                               # PNGs with the recipe embedded

``studio.pipe`` is the stock diffusers pipeline. Seed ``s`` means ``torch.Generator(device).manual_seed(s)``
as in diffusers, so a merge image is reproduced by plain diffusers with ``load_lora_weights`` +
``set_adapters`` and the same generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from PIL import Image

from fusion import RunContext, StepContext, StepPlan, Strategy, make_strategy
from pipelines import Composer, load_pipeline
from pipelines.adapters import ParsedLora, parse_lora
from pipelines.errors import OutOfMemoryError, StudioError
from pipelines.families import parse_block_spec, resolve_block_weights
from pipelines.loading import DEFAULT_MODEL, base_model_name, model_defaults
from pipelines.render import run_pipeline
from pipelines.tiny import TINY_BUILDERS, TINY_IMAGE_SIZE

from .lora import Lora, resolve_source
from .recipe import LoraRecipe, Recipe

LoraLike = str | Path | Lora | Mapping[str, Any]


@dataclass
class Result:
    """Images of one :meth:`Studio.compose` call, one recipe per image, timings in seconds."""

    images: list[Image.Image]
    recipes: list[Recipe]
    timings: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list, repr=False)
    strategy_info: dict[str, Any] = field(default_factory=dict)  # what the strategy measured (e.g. interference)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def recipe(self) -> Recipe:
        return self.recipes[0]

    def save(self, out_dir: str | Path, stem: str | None = None) -> list[Path]:
        out_dir = Path(out_dir)
        paths = []
        for image, recipe in zip(self.images, self.recipes):
            name = f"{stem or recipe.strategy}-seed{recipe.seed}.png"
            paths.append(recipe.save_png(image, out_dir / name))
        return paths


class Studio:
    """A loaded pipeline plus the adapters attached to it; compose as many images as you like."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        offload: bool = False,
        config: str | None = None,
        lora_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.model = model
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir else None
        # derived data strategies keep between runs (e.g. CMLoRA frequency profiles); None: their default
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.pipe, self.family = load_pipeline(model, device=device, dtype=dtype, offload=offload, config=config)
        self.defaults = model_defaults(base_model_name(model))
        self.composer = Composer(self.pipe, self.family)
        self._loaded: dict[tuple, str] = {}  # (resolved source, sha256) -> adapter name

    # ------------------------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def default_size(self) -> int:
        if "size" in self.defaults:
            return int(self.defaults["size"])
        if base_model_name(self.model) in TINY_BUILDERS:  # also a quantized tiny model
            return TINY_IMAGE_SIZE
        if self.family.name == "sdxl":
            return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return 1024

    def loaded(self) -> dict[str, ParsedLora]:
        """The LoRAs loaded from files or state dicts (not the adapters strategies derived from them)."""
        return {n: a.parsed for n, a in self.composer.adapters.items() if not a.derived_from}

    # ------------------------------------------------------------------------------------------ adapters
    def load(self, loras: Iterable[LoraLike]) -> list[str]:
        """Parse and attach the LoRAs that are not attached yet; returns their adapter names in order.

        All files are read and checked before any layer changes, so a bad file leaves the studio as it was.
        """
        specs = [Lora.parse(spec) for spec in loras]
        keys, pending = [], {}
        for spec in specs:
            if isinstance(spec.source, dict):
                key = ("dict", id(spec.source))
                if key not in self._loaded and key not in pending:
                    pending[key] = (spec, parse_lora(spec.source, self.pipe, self.family, name=spec.name,
                                                     metadata=spec.metadata))
            else:
                path = resolve_source(spec.source, self.lora_dir)
                stat = path.stat()
                key = ("file", str(path.resolve()), stat.st_size, stat.st_mtime_ns)
                if key not in self._loaded and key not in pending:
                    pending[key] = (spec, parse_lora(path, self.pipe, self.family, name=spec.name))
            keys.append(key)
        for key, (spec, parsed) in pending.items():
            name = self._unique_name(spec.name or parsed.name)
            self.composer.add(name, parsed)
            self._loaded[key] = name
        return [self._loaded[k] for k in keys]

    def inspect(self, source: str | Path) -> ParsedLora:
        """Read and check a LoRA file against this model without attaching it.

        Raises a :class:`StudioError` naming the file when it is unreadable or does not fit the model.
        """
        return parse_lora(resolve_source(source, self.lora_dir), self.pipe, self.family)

    def block_names(self) -> list[str]:
        """The blocks per-block weights address on this model (``te1``, ``down.0``, ``double.3``, ...)."""
        return self.family.block_names(self.pipe)

    def block_weights(self, spec: str | Mapping[str, float] | None) -> dict[str, float]:
        """Expand a block-weight spec (preset name, ``"down=0,mid=1"`` or dict) to one weight per block.

        Raises :class:`StudioError` for an unknown preset or block, or a value that is not a finite number.
        """
        return resolve_block_weights(self.family, self.block_names(), parse_block_spec(spec, self.family))

    def unload(self, names: Sequence[str] | None = None) -> None:
        """Detach adapters (all by default); with none left, the pipeline is bit-for-bit the base model."""
        names = list(self.composer.adapters) if names is None else list(names)
        for name in names:
            if name in self.composer.adapters:  # derived adapters leave with their sources
                self.composer.remove(name)
        self._loaded = {k: v for k, v in self._loaded.items() if v not in names}

    def _unique_name(self, base: str) -> str:
        name, i = base, 2
        while name in self.composer.adapters:
            name, i = f"{base}#{i}", i + 1
        return name

    # ------------------------------------------------------------------------------------------ compose
    def compose(
        self,
        prompt: str,
        loras: Iterable[LoraLike] = (),
        strategy: str | Strategy = "merge",
        *,
        strategy_params: Mapping[str, Any] | None = None,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        count: int = 1,
        scheduler: str | None = None,
        callback: Callable[[int, int, dict], None] | None = None,
        output_type: str = "pil",
        pipeline_kwargs: Mapping[str, Any] | None = None,
    ) -> Result:
        """Render ``count`` images (seeds ``seed``, ``seed+1``, ...) of ``prompt`` with ``loras`` fused by ``strategy``."""
        t0 = time.perf_counter()
        specs = [Lora.parse(spec) for spec in loras]
        strat = strategy if isinstance(strategy, Strategy) else make_strategy(strategy, strategy_params)
        seen = set()
        for spec in specs:
            key = id(spec.source) if isinstance(spec.source, dict) else str(spec.source)
            if key in seen:
                raise StudioError(f"LoRA {spec.label} appears twice in the stack; give it once with the weight you want")
            seen.add(key)
        steps = int(steps or self.defaults.get("steps", self.family.default_steps))
        guidance = float(self.defaults.get("guidance", self.family.default_guidance) if guidance is None else guidance)
        if "max_sequence_length" in self.defaults and self.family.name == "flux":
            pipeline_kwargs = {"max_sequence_length": self.defaults["max_sequence_length"], **(pipeline_kwargs or {})}
        width, height = int(width or self.default_size), int(height or self.default_size)
        if steps < 1 or count < 1:
            raise StudioError("steps and count must be at least 1")
        multiple = self.pipe.vae_scale_factor * (2 if self.family.name == "flux" else 1)
        if width < multiple or height < multiple or width % multiple or height % multiple:
            raise StudioError(f"width and height must be positive multiples of {multiple} for this model, "
                              f"got {width}x{height}")
        names = self.load(specs)
        t_load = time.perf_counter()
        self._set_block_weights(names, specs)
        if scheduler:
            self._set_scheduler(scheduler)
        state = self.composer.state
        weights = torch.tensor([s.weight for s in specs], dtype=torch.float32)

        def weights_at(step: int) -> torch.Tensor:
            progress = step / steps
            return torch.tensor([s.weight if s.start <= progress < s.end else 0.0 for s in specs])

        def columns_of(stack: list[str]) -> Callable[..., torch.Tensor]:
            """Rows over ``stack`` -> rows over all loaded adapter columns (``fill`` elsewhere)."""

            def to_columns(rows: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
                out = torch.full((rows.shape[0], len(state.names)), fill)
                if stack:
                    out[:, torch.tensor([state.column(n) for n in stack], dtype=torch.long)] = rows
                return out

            return to_columns

        step_weights = torch.stack([weights_at(s) for s in range(steps)]) if specs else torch.zeros(steps, 0)
        render = self._substack_renderer(names, columns_of(names), prompt=prompt, negative_prompt=negative_prompt,
                                         seed=seed, steps=steps, guidance=guidance, width=width, height=height,
                                         pipeline_kwargs=pipeline_kwargs)
        loaded = self.loaded()
        run = RunContext(names=names, weights=weights, num_steps=steps, family=self.family.name, pipe=self.pipe,
                         composer=self.composer, sources=[str(s.source) for s in specs], render=render,
                         model=self.model, hashes=[loaded[n].sha256 for n in names],
                         cache_dir=str(self.cache_dir) if self.cache_dir else None,
                         settings={"width": width, "height": height, "guidance": guidance,
                                   "negative_prompt": negative_prompt, "seed": seed, "steps": steps},
                         step_weights=step_weights)
        try:
            strat.prepare(run)
            t_prepared = time.perf_counter()
            stack = list(run.stack)  # the K LoRAs, or the adapters the strategy derived from them
            to_columns = columns_of(stack)

            def plan_for_step(step: int) -> StepPlan:
                if not specs:
                    return StepPlan(gains=torch.zeros(1, len(state.names)), weights=torch.ones(1), text_lanes=[0])
                plan = strat.plan(StepContext(step=step, num_steps=steps, weights=step_weights[step]))
                block_gains = None if plan.block_gains is None else to_columns(plan.block_gains, fill=1.0)
                layer_weights = None if plan.layer_weights is None else to_columns(plan.layer_weights, fill=1.0)
                return StepPlan(gains=to_columns(plan.gains), weights=plan.weights, text_lanes=plan.text_lanes,
                                extras=plan.extras, block_gains=block_gains, layer_weights=layer_weights)

            text_lanes = to_columns(strat.text_lanes(weights)) if specs else torch.zeros(1, len(state.names))
            images, recipes, latents = self._render_images(
                strat, specs, names, stack, plan_for_step, text_lanes, prompt=prompt,
                negative_prompt=negative_prompt, seed=seed, steps=steps, guidance=guidance, width=width,
                height=height, count=count, callback=callback, output_type=output_type,
                pipeline_kwargs=pipeline_kwargs)
        finally:
            strat.finish(run)
        t_end = time.perf_counter()
        warnings = [f"{self.loaded()[n].source}: {len(self.loaded()[n].skipped)} modules match no layer and were skipped"
                    for n in names if self.loaded()[n].skipped]
        return Result(images=images, recipes=recipes, latents=latents, warnings=warnings,
                      timings={"load_s": t_load - t0, "prepare_s": t_prepared - t_load, "render_s": t_end - t_load,
                               "total_s": t_end - t0, "per_image_s": (t_end - t_prepared) / count},
                      strategy_info=dict(strat.info))

    def _substack_renderer(self, names, to_columns, *, prompt, negative_prompt, seed, steps, guidance, width,
                           height, pipeline_kwargs) -> Callable[..., Any]:
        """``RunContext.render``: one image with the stack at gains ``row`` ([K]), float array [H, W, 3]."""

        def render(row, *, steps: int | None = steps, prompt: str | None = prompt, seed: int | None = seed):
            gains = to_columns(torch.as_tensor(row, dtype=torch.float32).reshape(1, -1))
            output, _ = run_pipeline(
                self.composer, stack=names, plan_for_step=lambda step: StepPlan(gains=gains, weights=torch.ones(1)),
                text_lanes=gains, prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=int(steps),
                guidance_scale=guidance, width=width, height=height,
                generator=torch.Generator(self.device.type).manual_seed(int(seed)), output_type="np",
                pipeline_kwargs=pipeline_kwargs,
            )
            return output.images[0]

        return render

    def _render_images(self, strat, specs, names, stack, plan_for_step, text_lanes, *, prompt, negative_prompt,
                       seed, steps, guidance, width, height, count, callback, output_type, pipeline_kwargs):
        images, recipes, latents = [], [], []
        for k in range(count):
            generator = torch.Generator(self.device.type).manual_seed(seed + k)
            try:
                output, _ = run_pipeline(
                    self.composer, stack=stack, plan_for_step=plan_for_step, text_lanes=text_lanes,
                    prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                    guidance_scale=guidance, width=width, height=height, generator=generator,
                    output_type=output_type, callback=callback, pipeline_kwargs=pipeline_kwargs,
                )
            except torch.OutOfMemoryError:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise OutOfMemoryError(
                    f"out of memory rendering {width}x{height} with {len(names)} LoRA(s) under '{strat.name}'; "
                    "nothing was changed. Try offload=True (--offload), a smaller size, or fewer LoRAs"
                ) from None
            image = output.images[0]
            if output_type == "pil":
                images.append(image)
            else:
                latents.append(image)
            recipes.append(self._recipe(prompt, negative_prompt, specs, names, strat, seed + k, steps, guidance,
                                        width, height))
        return images, recipes, latents

    def reproduce(self, recipe: Recipe, **overrides: Any) -> Result:
        """Render ``recipe`` again (its model must be this studio's model)."""
        loras = [Lora(**lora.to_lora_kwargs()) for lora in recipe.loras]
        kwargs = dict(
            strategy_params=recipe.strategy_params, negative_prompt=recipe.negative_prompt, seed=recipe.seed,
            steps=recipe.steps, guidance=recipe.guidance, width=recipe.width, height=recipe.height,
            scheduler=recipe.scheduler,
        )
        kwargs.update(overrides)
        return self.compose(recipe.prompt, loras, recipe.strategy, **kwargs)

    # ------------------------------------------------------------------------------------------ helpers
    def _set_block_weights(self, names: list[str], specs: list[Lora]) -> None:
        blocks = self.composer.state.blocks
        for name, spec in zip(names, specs):
            spec_dict = parse_block_spec(spec.blocks, self.family)
            self.composer.state.set_block_weights(name, resolve_block_weights(self.family, blocks, spec_dict))

    def _set_scheduler(self, name: str) -> None:
        import diffusers

        if type(self.pipe.scheduler).__name__ == name:
            return
        cls = getattr(diffusers, name, None)
        compatible = {c.__name__ for c in self.pipe.scheduler.compatibles}
        if cls is None or name not in compatible:
            raise StudioError(f"scheduler '{name}' is not compatible with this pipeline; use one of {sorted(compatible)}")
        self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config)

    def _recipe(self, prompt, negative, specs, names, strat, seed, steps, guidance, width, height) -> Recipe:
        loaded = self.loaded()
        loras = []
        for name, spec in zip(names, specs):
            parsed = loaded[name]
            source = parsed.source if not isinstance(spec.source, dict) else "<state dict>"
            blocks = spec.blocks if isinstance(spec.blocks, str) else (dict(spec.blocks) if spec.blocks else None)
            loras.append(LoraRecipe(source=source, weight=spec.weight, name=name, blocks=blocks, start=spec.start,
                                    end=spec.end, sha256=parsed.sha256))
        return Recipe(model=self.model, prompt=prompt, negative_prompt=negative, strategy=strat.name,
                      strategy_params=dict(strat.values), loras=loras, seed=seed, steps=steps, guidance=guidance,
                      width=width, height=height, scheduler=type(self.pipe.scheduler).__name__)


_STUDIOS: dict[tuple, Studio] = {}


def compose(
    prompt: str,
    loras: Iterable[LoraLike] = (),
    strategy: str = "merge",
    *,
    model: str = DEFAULT_MODEL,
    device: str | None = None,
    dtype: str | None = None,
    **kwargs: Any,
) -> Result:
    """One-call composition; keeps one :class:`Studio` per (model, device, dtype) for the next call."""
    key = (model, device, dtype)
    studio = _STUDIOS.get(key)
    if studio is None:
        studio = _STUDIOS[key] = Studio(model, device=device, dtype=dtype)
    return studio.compose(prompt, loras, strategy, **kwargs)
