"""Render a batch of :class:`~studio.grid.BatchItem` s: resumable, fault-tolerant, spread over processes.

    items, _ = load_grid("assets/grids/strategies-by-seed.toml")
    summary = run_batch(items, "out/batch", BatchOptions())

* **Resume.** Items whose id already has an ``ok`` line in the manifest are skipped, so running the same batch
  again renders only what is missing. Each PNG is written atomically (temporary file + rename, recipe embedded)
  and its manifest line is appended only afterwards, so a ``kill -9`` loses at most the image in flight.
* **Faults.** An out-of-memory on one item (:class:`~pipelines.errors.OutOfMemoryError` from
  ``Studio.compose``) or a strategy that refuses that item's stack (:class:`~pipelines.errors.StrategyError`,
  e.g. QR-LoRAs made on different bases) is recorded as a ``failed`` line with the reason and the batch goes on;
  a resume retries it. Any other error stops the batch (resume continues where it stopped).
* **Reuse.** One :class:`~studio.Studio` per model, kept for all of that model's items; every LoRA of those
  items is attached once, up front (a LoRA that does not fit the model stops the batch before it renders).
* **Several processes.** Under ``accelerate launch`` (or ``torchrun``), :class:`accelerate.PartialState` gives
  each process its index; the pending items are split with ``split_between_processes`` (contiguous, in plan
  order, so every process sees the same split). Each process appends to its own manifest shard; after a
  barrier the main process merges the shards and writes ``scores.csv``, ``report.html`` and the grid sheets.
  The output folder must be shared by all processes (a network file system across machines).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol, Sequence

from pipelines.errors import OutOfMemoryError, StrategyError, StudioError

from . import manifest as mf
from .grid import BatchItem
from .scoring import ClipScorer, default_clip_model, resolve_clip


class BatchError(StudioError):
    """A batch that cannot start (for example an output folder that already holds another batch)."""


@dataclass
class BatchOptions:
    score: bool = True
    clip_model: str | None = None  # None: default_clip_model() of the batch's models
    clip_pretrained: str | None = None     # None: the folder's own weights, or 'openai' for ViT-B-32
    clip_batch_size: int = 32
    device: str | None = None
    dtype: str | None = None
    offload: bool = False
    config: str | None = None
    resume: bool | None = None      # None: resume when the folder has a manifest
    report: bool = True
    inline_images: bool = False
    limits: Any = None              # studio.settings.Limits (None: the defaults)


@dataclass
class BatchSummary:
    planned: int
    done_before: int
    rendered: int          # by every process of this run
    failed: int            # items of the plan whose latest line is 'failed'
    missing: int           # items of the plan still without an image
    seconds: float
    num_processes: int = 1
    process_index: int = 0
    report: Path | None = None
    means: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # strategy -> (mean, std, n)


class Reporter(Protocol):
    def start(self, items: Sequence[BatchItem]) -> None: ...
    def item(self, item: BatchItem) -> None: ...
    def step(self, step: int, num_steps: int) -> None: ...
    def done(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class SilentReporter:
    def start(self, items): pass
    def item(self, item): pass
    def step(self, step, num_steps): pass
    def done(self, record): pass
    def close(self): pass


def distributed_state(device: str | None):
    """accelerate's :class:`PartialState`; CPU processes when asked for, or when there is no CUDA."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = (device or "").startswith("cpu") or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=timedelta(hours=72))


def run_batch(items: Sequence[BatchItem], out_dir: str | Path, options: BatchOptions | None = None,
              reporter: Reporter | None = None, studio=None) -> BatchSummary:
    """Render what ``out_dir`` lacks of ``items``; see the module docstring.

    ``studio``: an already-loaded :class:`~studio.Studio` to use for the items of its model (a notebook's
    session, say); it is left loaded afterwards. Other models get a Studio of their own, freed after use.
    """
    options = options or BatchOptions()
    reporter = reporter or SilentReporter()
    out = Path(out_dir)
    t0 = time.perf_counter()
    if options.score and options.clip_model is None:
        options = replace(options, clip_model=default_clip_model(item.model for item in items))
    if options.score:
        resolve_clip(options.clip_model, options.clip_pretrained)  # a bad scorer name fails before rendering
    state = distributed_state(options.device)
    rank, world = state.process_index, state.num_processes
    if options.resume is False and mf.manifest_files(out):
        raise BatchError(f"{out} already holds a batch ({mf.MANIFEST}); resume it (the default) or choose another --out")
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        for path in mf.manifest_files(out):
            mf.repair_tail(path)
        mf.remove_stale_temp_files(out)
    state.wait_for_everyone()
    done = mf.done_ids(out)
    state.wait_for_everyone()  # everyone has read the same state before anyone appends

    planned = {item.id for item in items}
    pending = sorted((item for item in items if item.id not in done), key=lambda it: it.model)
    with state.split_between_processes(pending) as mine:
        mine = list(mine)
    target = out / (mf.MANIFEST if world == 1 else mf.shard_name(rank, world))
    device = options.device
    if device is None and world > 1:
        device = str(state.device)
    reporter.start(mine)
    try:
        scorer = None
        if options.score and mine:
            scorer = ClipScorer(options.clip_model, options.clip_pretrained, batch_size=options.clip_batch_size,
                                device=device or state.device)
        for model, group in groupby(mine, key=lambda it: it.model):
            given = studio if studio is not None and studio.model == model else None
            _render_model(model, list(group), out, target, options, device, scorer, reporter, rank, given)
    finally:
        reporter.close()

    state.wait_for_everyone()
    summary = BatchSummary(planned=len(planned), done_before=len(planned & done), rendered=0, failed=0,
                           missing=0, seconds=0.0, num_processes=world, process_index=rank)
    if state.is_main_process:
        mf.merge_shards(out)
        records = mf.load_records(out)
        ok = {i for i, r in records.items() if r.get("status") == "ok"}
        summary.rendered = len((ok & planned) - done)
        summary.failed = sum(1 for i in planned - ok if i in records)
        summary.missing = len(planned - ok)
        if options.report:
            from .report import strategy_means, write_outputs

            summary.report = write_outputs(out, list(records.values()), inline_images=options.inline_images)
            summary.means = strategy_means([r for r in records.values() if r["id"] in planned])
    summary.seconds = time.perf_counter() - t0
    state.wait_for_everyone()
    return summary


def _render_model(model: str, items: list[BatchItem], out: Path, target: Path, options: BatchOptions,
                  device: str | None, scorer: ClipScorer | None, reporter: Reporter, rank: int, given=None) -> None:
    import torch

    from .api import Studio

    studio = given or Studio(model, device=device, dtype=options.dtype, offload=options.offload, config=options.config,
                             limits=options.limits)
    try:
        unique = {}
        for item in items:
            for lora in item.loras:
                unique.setdefault(str(lora.source), lora)
        studio.load(unique.values())  # every file parsed and checked once, before the first image
        for item in items:
            reporter.item(item)
            record = _render_item(studio, item, out, scorer, reporter)
            record["process"] = rank
            mf.append(target, record)
            reporter.done(record)
    finally:
        if given is None:
            del studio
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _render_item(studio, item: BatchItem, out: Path, scorer: ClipScorer | None, reporter: Reporter) -> dict[str, Any]:
    base = {"id": item.id, "item": item.report_fields()}
    t0 = time.perf_counter()
    try:
        result = studio.compose(
            item.prompt, item.loras, item.strategy.name, strategy_params=dict(item.strategy.params),
            negative_prompt=item.negative, seed=item.seed, steps=item.steps, guidance=item.guidance,
            width=item.width, height=item.height, scheduler=item.scheduler,
            callback=lambda step, num_steps, _kw: reporter.step(step, num_steps), **item.mode_kwargs(),
        )
    except (OutOfMemoryError, StrategyError) as e:
        reason = f"out of memory: {e}" if isinstance(e, OutOfMemoryError) else f"{item.strategy.name}: {e}"
        return {**base, "status": "failed", "error": reason, "file": None,
                "timings": {"total_s": time.perf_counter() - t0}, "finished_at": _now()}
    t_render = time.perf_counter()
    _check_inputs_unchanged(item, result.recipe)
    result.recipe.save_png(result.image, out / item.file)
    t_saved = time.perf_counter()
    record = {**base, "status": "ok", "file": item.file, "recipe": result.recipe.to_dict()}
    scores: dict[str, Any] = {}
    if scorer is not None:
        names = list(item.concepts)
        values = scorer.score_many([result.image], [[item.prompt, *(item.concepts[n] for n in names)]])[0]
        scores = {"clip": values[0], "concepts": dict(zip(names, values[1:]))}
        record["scorer"] = scorer.name
    t_scored = time.perf_counter()
    record["scores"] = scores
    record["timings"] = {**{k: round(v, 4) for k, v in result.timings.items()},
                         "save_s": round(t_saved - t_render, 4), "score_s": round(t_scored - t_saved, 4),
                         "item_s": round(t_scored - t0, 4)}
    record["finished_at"] = _now()
    if result.warnings:
        record["warnings"] = result.warnings
    return record


def _check_inputs_unchanged(item: BatchItem, recipe) -> None:
    """The input images rendered are the ones the item's id was planned with (a file edited during the batch
    would otherwise be saved under the id of its old content)."""
    for planned in item.inputs.files:
        used = (recipe.inputs or {}).get(planned.role, {}).get("sha256")
        if used != planned.sha256:
            raise BatchError(f"{planned.written}: the {planned.role.replace('_', ' ')} changed after the grid was "
                             "read; run the batch again to plan it with the new file")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
