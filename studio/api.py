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

import functools
import time
import warnings
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
from pipelines.compiled import CompiledDenoiser, compile_backend
from pipelines.control_lora import ControlLoraFile, applied_control_lora, apply_control_lora, read_control_lora, \
    remove_control_lora
from pipelines.lane_memory import parse_max_lanes
from pipelines.loading import DEFAULT_MODEL, base_model_name, model_defaults
from pipelines.mode_inputs import prepare_mode_inputs, size_of_image
from pipelines.modes import check_wrappable, classify_pipeline
from pipelines.quant.runtime import primary, select_runtime
from pipelines.render import run_pipeline
from pipelines.tiny import TINY_BUILDERS, TINY_IMAGE_SIZE

from .lora import Lora, resolve_source
from .recipe import LoraRecipe, Recipe
from .recipe_inputs import recipe_control_lora, recipe_controlnet, recipe_inputs, record_mode
from .settings import DEFAULT_LIMITS, Limits, RenderDefaults, check_settings, render_defaults

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
    # the masks a regional render used (regional boxes/masks, region=auto, clora), for drawing over the image: lane
    # label (its LoRAs' names, ", "-joined) -> [h, w] float in [0, 1] on the denoiser's grid (latent pixels for SDXL,
    # 2x2-patch tokens for FLUX), on the CPU; the first image's when count > 1; empty for strategies without regions
    region_masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def recipe(self) -> Recipe:
        return self.recipes[0]

    def save(self, out_dir: str | Path, stem: str | None = None) -> list[Path]:
        """Write each image as ``<stem or strategy>-seed<seed>.png``; an existing file is never overwritten (the
        new image gets the next free ``-1``, ``-2``, ... name)."""
        from pipelines.atomic_files import reserve_new_path

        out_dir = Path(out_dir)
        paths = []
        for image, recipe in zip(self.images, self.recipes):
            name = f"{stem or recipe.strategy}-seed{recipe.seed}.png"
            path = reserve_new_path(out_dir / name)
            try:
                paths.append(recipe.save_png(image, path))
            except BaseException:
                path.unlink(missing_ok=True)  # the reserved name, still empty
                raise
        return paths


def _transaction(method):
    """Loading and rendering are all-or-nothing: if ``method`` fails anywhere (parsing, attaching, a strategy's
    preparation, the first forward), every adapter it attached is detached again and the scheduler restored."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        adapters_before, scheduler = set(self.composer.adapters), self.pipe.scheduler
        control_before = applied_control_lora(self.pipe)
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self._roll_back(adapters_before, scheduler)
            if applied_control_lora(self.pipe) is not control_before:  # the control LoRA as it was, too
                self._set_control_lora(None if control_before is None else control_before.file,
                                       None if control_before is None else control_before.scale)
            raise

    return run


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
        max_lanes: int | str | None = "auto",
        compile: bool | str = False,
        runtime: str | None = None,
        limits: Limits | None = None,
        pipe: Any = None,
    ):
        self.model = model
        self.limits = limits or DEFAULT_LIMITS  # work one compose() may ask for (studio.settings)
        # lanes per denoiser call (pipelines.lane_memory): an int, "auto" (free device memory; CPU: all), "all"
        self.max_lanes = parse_max_lanes(max_lanes)
        backend = compile_backend(compile)
        self.lora_dir = Path(lora_dir).expanduser() if lora_dir else None
        # derived data strategies keep between runs (e.g. CMLoRA frequency profiles); None: their default
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        if pipe is None:
            self.pipe, self.family = load_pipeline(model, device=device, dtype=dtype, offload=offload, config=config)
        else:  # a pipeline the caller built (from_pipe): used as it is, never reloaded, moved or cast
            self.pipe, self.family = pipe, classify_pipeline(pipe)[0]
        # 4-bit models: how the quantized layers compute (pipelines.quant.runtime; None: the folder's, else auto)
        self.runtime, self.runtime_counts = select_runtime(getattr(self.pipe, self.family.denoiser), runtime,
                                                           self.device, getattr(self.pipe, "studio_quant_info", None))
        self.defaults = model_defaults(base_model_name(model))
        self.composer = Composer(self.pipe, self.family)
        self._loaded: dict[tuple, str] = {}  # (resolved source, sha256) -> adapter name
        # torch.compile of the denoiser with its composed layers (pipelines.compiled); a string names the backend
        self.compiled = CompiledDenoiser(getattr(self.pipe, self.family.denoiser), backend) if backend else None

    @classmethod
    def from_pipe(cls, pipe: Any, *, model: str | None = None, **options: Any) -> "Studio":
        """Wrap a diffusers pipeline you built (your scheduler, VAE, offloading, ...): any class of
        :data:`pipelines.modes.PIPELINE_CLASSES` (SDXL / FLUX.1 text-to-image, img2img, inpainting, ControlNet) or a
        ``FluxFillPipeline`` (inpainting only: its transformer takes the masked image and mask as input).

        Its components are used as they are, never reloaded, moved or cast; every mode runs on them (the other
        modes' pipelines share the same modules). :meth:`unload` leaves ``pipe`` bit for bit as it was.
        ``model`` names the base model in recipes (default: the pipeline's ``_name_or_path``, else its class);
        ``options`` are the other :class:`Studio` keywords (``lora_dir``, ``max_lanes``, ``limits``, ...).
        """
        family, _ = classify_pipeline(pipe)  # a clear error for anything else, before the pipeline is touched
        check_wrappable(pipe, family)
        refused = sorted({"device", "dtype", "offload", "config"} & set(options))
        if refused:
            raise StudioError(f"from_pipe uses the pipeline as it is; set {', '.join(refused)} on it before wrapping")
        name = model or pipe.config.get("_name_or_path") or f"<{type(pipe).__name__}>"
        studio = cls(str(name), pipe=pipe, **options)
        studio._user_scheduler = pipe.scheduler
        return studio

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

    def render_defaults(self) -> RenderDefaults:
        """Steps, guidance and size that ``compose`` uses for settings left out (one source: studio.settings)."""
        return render_defaults(self.model, self.family, size=self.default_size, shipped=self.defaults)

    def loaded(self) -> dict[str, ParsedLora]:
        """The LoRAs loaded from files or state dicts (not the adapters strategies derived from them)."""
        return {n: a.parsed for n, a in self.composer.adapters.items() if not a.derived_from}

    # ------------------------------------------------------------------------------------------ adapters
    def _roll_back(self, adapters_before: set[str], scheduler) -> None:
        """Undo what a failed ``load``/``compose`` changed: detach every adapter it attached, restore the
        scheduler, so the studio is exactly as before the call (the no-LoRA image stays bit-identical)."""
        added = [n for n in self.composer.adapters if n not in adapters_before]
        self.unload(added)
        self.pipe.scheduler = scheduler

    @_transaction
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
            if parsed.skipped:  # loaded, but never silently: say what was left out
                shown = ", ".join(parsed.skipped[:4]) + (" ..." if len(parsed.skipped) > 4 else "")
                warnings.warn(f"{parsed.source}: {len(parsed.skipped)} module(s) match no layer of this model and "
                              f"were skipped ({shown})", stacklevel=3)
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
        """Detach adapters (all by default, and the control LoRA); with none left, the pipeline is bit-for-bit the
        base model (and a pipeline given to :meth:`from_pipe` has its own scheduler back)."""
        if names is None and applied_control_lora(self.pipe) is not None:
            self._set_control_lora(None, None)
        names = list(self.composer.adapters) if names is None else list(names)
        for name in names:
            if name in self.composer.adapters:  # derived adapters leave with their sources
                self.composer.remove(name)
        self._loaded = {k: v for k, v in self._loaded.items() if v not in names}
        if not self.composer.adapters and getattr(self, "_user_scheduler", None) is not None:
            self.pipe.scheduler = self._user_scheduler

    # ------------------------------------------------------------------------------------------ control LoRA
    def _control_lora_file(self, control_lora: LoraLike) -> tuple[ControlLoraFile, float]:
        """Read and check a control LoRA (``path`` or ``"path:weight"``) against this model; nothing changes."""
        spec = Lora.parse(control_lora)
        if isinstance(spec.source, dict) or spec.blocks is not None or (spec.start, spec.end) != (0.0, 1.0) \
                or spec.region is not None or spec.prompt is not None:
            raise StudioError(f"control LoRA {spec.label}: give a file and a weight only (it is applied to the model "
                              "as a whole: no state dicts, blocks, step windows or regions)")
        if self.compiled is not None:
            raise StudioError("control LoRAs change the transformer's input width; they are not supported with "
                              "compile=")
        path = resolve_source(spec.source, self.lora_dir)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        files = self.__dict__.setdefault("_control_files", {})
        if key not in files:
            files.clear()  # one kept: switching back and forth reads again
            files[key] = read_control_lora(path, self.pipe, self.family)
        return files[key], spec.weight

    def _set_control_lora(self, file: ControlLoraFile | None, scale: float | None) -> None:
        """Make ``file`` at ``scale`` the applied control LoRA (``None``: none). A change of the base model: the
        attached LoRAs are detached first and parsed again on the next compose, against the new model."""
        applied = applied_control_lora(self.pipe)
        if applied is None and file is None:
            return
        if applied is not None and file is not None and applied.file is file and applied.scale == scale:
            return
        self.unload(list(self.composer.adapters))
        remove_control_lora(self.pipe)
        if file is not None:
            apply_control_lora(self.pipe, file, float(scale))

    def _unique_name(self, base: str) -> str:
        name, i = base, 2
        while name in self.composer.adapters:
            name, i = f"{base}#{i}", i + 1
        return name

    # ------------------------------------------------------------------------------------------ compose
    @_transaction
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
        max_lanes: int | str | None = None,
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        control_image: Any = None,
        controlnet: Any = None,
        controlnet_conditioning_scale: float | None = None,
        control_lora: LoraLike | None = None,
    ) -> Result:
        """Render ``count`` images (seeds ``seed``, ``seed+1``, ...) of ``prompt`` with ``loras`` fused by ``strategy``.

        ``max_lanes`` (default: the studio's) caps the lanes per denoiser call; it changes memory, not the image.
        ``image`` (a PIL image or file) makes it img2img, with ``mask_image`` (single-channel, white = repaint)
        inpainting; ``strength`` in (0, 1] is the part of the ``steps`` schedule they run (pipelines.modes). Without
        ``width``/``height`` the size is the image's (rounded down to the model's multiple). ``control_image``
        makes it ControlNet, with ``controlnet`` (a diffusers ControlNet model or folder; default: the pipeline's own
        from :meth:`from_pipe`) at ``controlnet_conditioning_scale`` (default: the diffusers pipeline's, recorded).
        ``control_lora`` (a FLUX control LoRA file, ``"file:weight"``; BFL Canny/Depth) with ``control_image`` runs
        diffusers' ``FluxControlPipeline``: the control LoRA is applied to the model (pipelines.control_lora) and
        the LoRAs compose on top with any strategy; it stays applied until a compose without it or :meth:`unload`.
        """
        t0 = time.perf_counter()
        checked = check_settings(  # one validation of every setting, before anything loads (studio.settings)
            prompt=prompt, negative_prompt=negative_prompt, steps=steps, guidance=guidance, width=width,
            height=height, seed=seed, count=count, scheduler=scheduler,
            strategy=None if isinstance(strategy, Strategy) else strategy,
            strategy_params=None if isinstance(strategy, Strategy) else strategy_params, limits=self.limits)
        seed, count = checked.get("seed", 0), checked["count"]
        steps, guidance = checked.get("steps"), checked.get("guidance")
        width, height = checked.get("width"), checked.get("height")
        max_lanes = self.max_lanes if max_lanes is None else parse_max_lanes(max_lanes)
        strength = check_settings(strength=strength, limits=self.limits).get("strength")
        given = image if image is not None else control_image
        if isinstance(given, (list, tuple)) and given:  # multi-ControlNet: the first control image's size
            given = given[0]
        if given is not None and width is None and height is None:  # the input image's own size
            width, height = size_of_image(given, self.pipe.vae_scale_factor * (2 if self.family.name == "flux" else 1))
        specs = [Lora.parse(spec) for spec in loras]
        strat = strategy if isinstance(strategy, Strategy) else make_strategy(strategy, strategy_params)
        regional = [s.label for s in specs if s.region is not None or s.prompt is not None]
        if regional and not strat.uses_regions:
            raise StudioError(f"LoRA(s) {', '.join(regional)} have a region or region prompt, which only the "
                              f"'regional' strategy uses; '{strat.name}' would ignore them. Use strategy 'regional' "
                              "or drop region=/prompt=")
        seen = set()
        for spec in specs:
            key = id(spec.source) if isinstance(spec.source, dict) else str(spec.source)
            if key in seen:
                raise StudioError(f"LoRA {spec.label} appears twice in the stack; give it once with the weight you want")
            seen.add(key)
        defaults = self.render_defaults()
        steps = int(defaults.steps if steps is None else steps)
        guidance = float(defaults.guidance if guidance is None else guidance)
        if "max_sequence_length" in self.defaults and self.family.name == "flux":
            pipeline_kwargs = {"max_sequence_length": self.defaults["max_sequence_length"], **(pipeline_kwargs or {})}
        width, height = int(defaults.width if width is None else width), int(defaults.height if height is None else height)
        check_settings(width=width, height=height, limits=self.limits)  # a default size within the limits too
        multiple = self.pipe.vae_scale_factor * (2 if self.family.name == "flux" else 1)
        if width < multiple or height < multiple or width % multiple or height % multiple:
            raise StudioError(f"width and height must be positive multiples of {multiple} for this model, "
                              f"got {width}x{height}")
        mode_inputs = prepare_mode_inputs(  # checked, sized and hashed (pipelines.modes)
            self.family, image=image, mask_image=mask_image, strength=strength, width=width, height=height,
            control_image=control_image, controlnet=controlnet, controlnet_conditioning_scale=controlnet_conditioning_scale,
            pipe=self.pipe, controlnet_cache=self.__dict__.setdefault("_controlnets", {}),
            control_lora=control_lora is not None)
        control = self._control_lora_file(control_lora) if control_lora is not None else (None, None)
        if control[0] is not None:
            mode_inputs.control_lora = {"source": control[0].source, "sha256": control[0].sha256, "weight": control[1]}
        pipeline_kwargs = mode_inputs.merge_into(pipeline_kwargs)
        self._set_control_lora(*control)  # a base-model change (pipelines.control_lora); undone if this call fails
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
                                   "negative_prompt": negative_prompt, "seed": seed, "steps": steps,
                                   "prompt": prompt},
                         step_weights=step_weights, regions=[s.region for s in specs],
                         region_prompts=[s.prompt for s in specs])
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
                pipeline_kwargs=pipeline_kwargs, max_lanes=max_lanes,
                lane_prompts=strat.lane_prompts(prompt) if specs else None)
            for recipe in recipes:
                record_mode(recipe, mode_inputs)
        finally:
            strat.finish(run)
        t_end = time.perf_counter()
        warnings = [f"{self.loaded()[n].source}: {len(self.loaded()[n].skipped)} modules match no layer and were skipped"
                    for n in names if self.loaded()[n].skipped] + mode_inputs.notes
        return Result(images=images, recipes=recipes, latents=latents, warnings=warnings,
                      timings={"load_s": t_load - t0, "prepare_s": t_prepared - t_load, "render_s": t_end - t_load,
                               "total_s": t_end - t0, "per_image_s": (t_end - t_prepared) / count},
                      strategy_info=dict(strat.info),
                      region_masks={label: mask.detach().float().cpu().clone()
                                    for label, mask in getattr(strat, "region_masks", {}).items()})

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
                       seed, steps, guidance, width, height, count, callback, output_type, pipeline_kwargs,
                       max_lanes="auto", lane_prompts=None):
        images, recipes, latents = [], [], []
        for k in range(count):
            generator = torch.Generator(self.device.type).manual_seed(seed + k)
            try:
                output, _ = run_pipeline(
                    self.composer, stack=stack, plan_for_step=plan_for_step, text_lanes=text_lanes,
                    prompt=prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                    guidance_scale=guidance, width=width, height=height, generator=generator,
                    output_type=output_type, callback=callback, pipeline_kwargs=pipeline_kwargs,
                    max_lanes=max_lanes, lane_prompts=lane_prompts,
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

    def reproduce(self, recipe: Recipe, *, input_policy: Any = None, **overrides: Any) -> Result:
        """Render ``recipe`` again (its model must be this studio's model).

        An img2img / inpainting recipe reads its recorded input files (or ``image=`` / ``mask_image=`` given
        here; ``input_policy``: a :class:`~studio.path_policy.PathPolicy` the recorded files must satisfy) and
        refuses when one is missing or differs from the recorded SHA-256 (studio.recipe_inputs).
        """
        loras = [Lora(**lora.to_lora_kwargs()) for lora in recipe.loras]
        kwargs = dict(
            strategy_params=recipe.strategy_params, negative_prompt=recipe.negative_prompt, seed=recipe.seed,
            steps=recipe.steps, guidance=recipe.guidance, width=recipe.width, height=recipe.height,
            scheduler=recipe.scheduler,
        )
        given = {role: overrides.pop(role, None) for role in ("image", "mask_image", "control_image")}
        kwargs.update(recipe_inputs(recipe, given, input_policy), strength=recipe.strength)
        control_lora = recipe_control_lora(recipe, overrides.pop("control_lora", None), input_policy)
        if control_lora is not None:
            kwargs["control_lora"] = control_lora
        if (recipe.mode or "").startswith("controlnet"):
            kwargs.update(controlnet=recipe_controlnet(recipe, overrides.pop("controlnet", None), input_policy),
                          controlnet_conditioning_scale=recipe.controlnet_conditioning_scale)
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
                                    end=spec.end, sha256=parsed.sha256, region=spec.region, prompt=spec.prompt))
        return Recipe(model=self.model, runtime=primary(self.runtime_counts) or "auto",
                      prompt=prompt, negative_prompt=negative, strategy=strat.name,
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
    runtime: str | None = None,
    **kwargs: Any,
) -> Result:
    """One-call composition; keeps one :class:`Studio` per (model, device, dtype, 4-bit runtime) for the next call."""
    key = (model, device, dtype, runtime)
    studio = _STUDIOS.get(key)
    if studio is None:
        studio = _STUDIOS[key] = Studio(model, device=device, dtype=dtype, runtime=runtime)
    return studio.compose(prompt, loras, strategy, **kwargs)
