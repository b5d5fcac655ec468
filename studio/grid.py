"""Batch inputs → :class:`BatchItem` s with stable ids.

A batch is the product of prompts × LoRA stacks × axes (strategies, LoRA weights, seeds, steps, guidance). Two
inputs describe one:

* a TOML **grid** (:func:`load_grid`)::

      model = "tiny-sdxl"
      steps = 8                                   # fixed values, or lists under [axes]

      [[stacks]]
      name = "zorb+inkwash"
      loras = [{ source = "../loras/tiny-sdxl/subject-zorb.safetensors", name = "subject", weight = 0.9,
                 concept = "a zorb" },
               "../loras/tiny-sdxl/style-striped.safetensors:0.7:name=style"]

      [[prompts]]
      text = "a zorb in a garden, inkwash painting"
      concepts = { style = "inkwash painting" }   # per-LoRA concept text (scored on its own)

      [axes]
      strategy = ["merge", "switch:tau=2", { name = "composite" }]
      seed = [0, 1]
      weights = [0.6, [0.9, 0.5]]                 # one weight for every LoRA, or one per LoRA

      [report]
      columns = "seed"                            # or "weights", "steps", "guidance"

* a plain prompt list (TXT, CSV, JSONL; see :mod:`studio.prompt_list`) plus ``--lora``/``--strategy`` options.

An item's id is a hash of its normalised recipe (model, prompt, negative prompt, strategy with every parameter
filled in, LoRAs as written with weight/blocks/window, seed, steps, guidance, size, scheduler; for img2img,
inpainting and ControlNet items also the input images by SHA-256, strength and ControlNet, see
:mod:`studio.grid_inputs`), so it is the
same in every run and every process; resuming and splitting work across processes rely on it. LoRA sources
enter the id as written (not as resolved absolute paths) so nodes that mount the files elsewhere agree.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.errors import LoraFileError, StudioError

from .grid_inputs import MODE_AXIS_KEYS, MODE_TOP_KEYS, GridInputs, InputResolver, check_mode_axes, id_fields
from .lora import Lora, resolve_source
from .path_policy import PathPolicy
from .settings import DEFAULT_LIMITS, Limits, check_settings

MAX_GRID_CHARS = 1_000_000  # a grid file is read and parsed only below this size
MAX_ITEMS = 100_000         # images one batch may plan

COLUMN_AXES = ("seed", "weights", "steps", "guidance", "strength", "controlnet_scale")
TOP_KEYS = {"model", "negative", "width", "height", "scheduler", "steps", "guidance", "seed", "lora_dir",
            "stacks", "loras", "prompts", "axes", "report", *MODE_TOP_KEYS}
AXIS_KEYS = {"strategy", "seed", "weights", "steps", "guidance", *MODE_AXIS_KEYS}
STACK_KEYS = {"name", "loras"}
LORA_KEYS = {"source", "weight", "name", "blocks", "start", "end", "concept"}
PROMPT_KEYS = {"text", "negative", "concepts", "image", "mask", "control_image"}
REPORT_KEYS = {"columns"}


class GridError(StudioError):
    """A batch input (grid, prompt list, option) that cannot be used; names the file and line."""

    def __init__(self, origin: str, problem: str, line: int | None = None):
        self.origin, self.line, self.problem = origin, line, problem
        super().__init__(f"{origin}{f':{line}' if line else ''}: {problem}")


# ---------------------------------------------------------------------------------------------- choices
@dataclass(frozen=True)
class StrategyChoice:
    """A strategy with all its parameters (declared defaults filled in) and a label for reports."""

    name: str
    params: tuple[tuple[str, Any], ...]
    label: str

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any]) -> "StrategyChoice":
        """``"switch"``, ``"switch:tau=2"`` or ``{name = "switch", tau = 2, label = "..."}``."""
        from fusion import make_strategy

        if isinstance(spec, str):
            name, *rest = spec.split(":")
            given: dict[str, Any] = {}
            for item in rest:
                if "=" not in item:
                    raise StudioError(f"strategy '{spec}': '{item}' must look like name=value")
                key, value = item.split("=", 1)
                given[key.strip()] = value.strip()
            label = None
        elif isinstance(spec, Mapping):
            given = dict(spec)
            name = given.pop("name", None)
            label = given.pop("label", None)
            if not isinstance(name, str):
                raise StudioError(f"strategy {dict(spec)} needs a 'name'")
        else:
            raise StudioError(f"a strategy is a name or a table, got {spec!r}")
        strategy = make_strategy(name.strip(), given)  # raises StrategyError for unknown names / parameters
        params = tuple(sorted(strategy.values.items()))
        if label is None:
            shown = {k: strategy.values[k] for k in given}
            label = name.strip() + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")
        return cls(name=name.strip(), params=params, label=str(label))


@dataclass
class BatchItem:
    """One image of a batch: everything ``Studio.compose`` needs plus where it goes in the report."""

    model: str
    prompt: str
    negative: str
    strategy: StrategyChoice
    loras: list[Lora]             # sources resolved to local files (or left for the Hub)
    lora_sources: list[str]       # sources as written, for the id
    concepts: dict[str, str]      # LoRA name -> concept text
    seed: int
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    inputs: GridInputs = field(default_factory=GridInputs)  # img2img / inpainting / ControlNet (studio.grid_inputs)
    strength: float | None = None
    controlnet_scale: float | None = None
    prompt_index: int = 0
    position: int = 0             # index in the plan (report order)
    stack: str = ""
    row: str = ""
    column: str = ""
    group: str = ""
    id: str = field(default="", init=False)

    def __post_init__(self):
        self.id = item_id(self)

    @property
    def file(self) -> str:
        """Where the PNG goes, relative to the output folder."""
        return f"images/{slug(self.prompt, 48)}/{slug(self.strategy.label, 40)}-seed{self.seed}-{self.id[:10]}.png"

    @property
    def label(self) -> str:
        return f"{self.prompt[:40]} | {self.row} | {self.column}"

    @property
    def weights(self) -> list[float]:
        return [lora.weight for lora in self.loras]

    def mode_kwargs(self) -> dict[str, Any]:
        """The ``Studio.compose`` arguments of the item's input images, strength and ControlNet."""
        out: dict[str, Any] = {f.role: f.path for f in self.inputs.files}
        if self.inputs.files:
            out.update(strength=self.strength, controlnet=self.inputs.controlnet,
                       controlnet_conditioning_scale=self.controlnet_scale)
        if self.inputs.control_lora is not None:  # a FLUX control LoRA (pipelines.control_lora)
            out["control_lora"] = Lora(source=self.inputs.control_lora.path, weight=self.inputs.control_lora_weight)
        return out

    def report_fields(self) -> dict[str, Any]:
        """What the manifest keeps besides the recipe, so a report can be built from the manifest alone."""
        return {"prompt_index": self.prompt_index, "position": self.position, "stack": self.stack,
                "strategy": self.strategy.label, "row": self.row, "column": self.column, "group": self.group,
                "weights": self.weights, "concepts": dict(self.concepts),
                **({"inputs": {f.role: f.written for f in self.inputs.files}, "strength": self.strength,
                    "controlnet_scale": self.controlnet_scale} if self.inputs.files else {})}


def item_id(item: BatchItem) -> str:
    """16 hex digits of the SHA-256 of the item's normalised recipe."""
    loras = [{"source": src, "weight": float(lora.weight), "name": lora.name,
              "blocks": lora.blocks if isinstance(lora.blocks, (str, type(None))) else dict(sorted(lora.blocks.items())),
              "start": float(lora.start), "end": float(lora.end)}
             for src, lora in zip(item.lora_sources, item.loras)]
    normal = {"model": item.model, "prompt": item.prompt, "negative": item.negative, "strategy": item.strategy.name,
              "params": [[k, v] for k, v in item.strategy.params], "loras": loras, "seed": int(item.seed),
              "steps": item.steps, "guidance": None if item.guidance is None else float(item.guidance),
              "width": item.width, "height": item.height, "scheduler": item.scheduler}
    mode = id_fields(item.inputs, item.strength, item.controlnet_scale)
    if mode is not None:  # text-to-image items keep the ids they always had
        normal["mode"] = mode
    text = json.dumps(normal, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def slug(text: str, limit: int) -> str:
    out = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return (out[:limit].rstrip("-") or "x")


# ---------------------------------------------------------------------------------------------- expansion
@dataclass
class Stack:
    name: str
    loras: list[Lora]
    sources: list[str]
    concepts: dict[str, str]


@dataclass
class PromptSpec:
    text: str
    negative: str | None = None
    concepts: dict[str, str] = field(default_factory=dict)
    origin: str = ""
    inputs: GridInputs = field(default_factory=GridInputs)


@dataclass
class Axes:
    strategies: list[StrategyChoice]
    seeds: list[int] = field(default_factory=lambda: [0])
    weights: list[float | list[float] | None] = field(default_factory=lambda: [None])
    steps: list[int | None] = field(default_factory=lambda: [None])
    guidance: list[float | None] = field(default_factory=lambda: [None])
    columns: str | None = None
    strengths: list[float | None] = field(default_factory=lambda: [None])
    controlnet_scales: list[float | None] = field(default_factory=lambda: [None])

    def column_axis(self) -> str:
        if self.columns:
            return self.columns
        sizes = {"seed": len(self.seeds), "weights": len(self.weights), "steps": len(self.steps),
                 "guidance": len(self.guidance), "strength": len(self.strengths),
                 "controlnet_scale": len(self.controlnet_scales)}
        return next((axis for axis in COLUMN_AXES if sizes[axis] > 1), "seed")


def weights_label(weights: float | list[float] | None) -> str:
    if weights is None:
        return "stack weights"
    if isinstance(weights, list):
        return "w=" + "/".join(f"{w:g}" for w in weights)
    return f"w={weights:g}"


def check_axes(prompts: Sequence[PromptSpec], axes: Axes, *, origin: str, negative: str, width: int | None,
               height: int | None, scheduler: str | None, limits: Limits) -> None:
    """Every setting a batch will use, checked once before anything loads (:mod:`studio.settings`)."""
    try:
        check_settings(negative_prompt=negative, width=width, height=height, scheduler=scheduler, limits=limits)
        for value in axes.steps:
            check_settings(steps=value, limits=limits)
        for value in axes.guidance:
            check_settings(guidance=value, limits=limits)
        for value in axes.seeds:
            check_settings(seed=value, limits=limits)
        for prompt in prompts:
            check_settings(prompt=prompt.text, negative_prompt=prompt.negative, limits=limits)
    except StudioError as e:
        raise GridError(origin, str(e)) from None


def expand(model: str, prompts: Sequence[PromptSpec], stacks: Sequence[Stack], axes: Axes, *, origin: str,
           negative: str = "", width: int | None = None, height: int | None = None,
           scheduler: str | None = None, limits: Limits = DEFAULT_LIMITS) -> list[BatchItem]:
    """The product prompts × stacks × weights × steps × guidance × strengths × ControlNet scales × strategies ×
    seeds, in that order."""
    check_axes(prompts, axes, origin=origin, negative=negative, width=width, height=height, scheduler=scheduler,
               limits=limits)
    planned = (len(prompts) * len(stacks) * len(axes.weights) * len(axes.steps) * len(axes.guidance)
               * len(axes.strengths) * len(axes.controlnet_scales) * len(axes.strategies) * len(axes.seeds))
    if planned > MAX_ITEMS:
        raise GridError(origin, f"the grid plans {planned} images; at most {MAX_ITEMS} fit one batch (split it)")
    column = axes.column_axis()
    varying = {"stack": len(stacks) > 1, "weights": len(axes.weights) > 1, "steps": len(axes.steps) > 1,
               "guidance": len(axes.guidance) > 1, "strength": len(axes.strengths) > 1,
               "controlnet_scale": len(axes.controlnet_scales) > 1, "seed": len(axes.seeds) > 1}
    items: list[BatchItem] = []
    seen: set[str] = set()
    for p_index, prompt in enumerate(prompts):
        for stack in stacks:
            unknown = sorted(set(prompt.concepts) - {lora.label for lora in stack.loras})
            if unknown:
                raise GridError(prompt.origin or origin, f"concept(s) for {unknown}, but stack '{stack.name}' has LoRAs "
                                f"{[lora.label for lora in stack.loras]}")
            concepts = {**stack.concepts, **prompt.concepts}
            for weights, steps, guidance, strength, scale, strategy, seed in product(
                    axes.weights, axes.steps, axes.guidance, axes.strengths, axes.controlnet_scales, axes.strategies,
                    axes.seeds):
                values = {"stack": f"stack {stack.name}", "weights": weights_label(weights),
                          "steps": f"{steps} steps" if steps else "default steps",
                          "guidance": "default guidance" if guidance is None else f"guidance {guidance:g}",
                          "strength": "default strength" if strength is None else f"strength {strength:g}",
                          "controlnet_scale": "default scale" if scale is None else f"control scale {scale:g}",
                          "seed": f"seed {seed}"}
                fixed = [values[k] for k in ("stack", "weights", "steps", "guidance", "strength", "controlnet_scale",
                                             "seed") if varying[k] and k != column]
                item = BatchItem(
                    model=model, prompt=prompt.text, negative=negative if prompt.negative is None else prompt.negative,
                    strategy=strategy, loras=_weighted(stack, weights, origin), lora_sources=list(stack.sources),
                    concepts=concepts, seed=int(seed), steps=steps, guidance=guidance, width=width, height=height,
                    scheduler=scheduler, inputs=prompt.inputs, strength=strength, controlnet_scale=scale,
                    prompt_index=p_index, position=len(items), stack=stack.name,
                    row=strategy.label, column=values[column], group=" · ".join([prompt.text, *fixed]),
                )
                if item.id in seen:
                    raise GridError(origin, f"the grid names the same image twice ({item.label}); "
                                            "remove the repeated axis value, prompt or strategy")
                seen.add(item.id)
                items.append(item)
    return items


def _weighted(stack: Stack, weights: float | list[float] | None, origin: str) -> list[Lora]:
    if weights is None:
        return list(stack.loras)
    values = weights if isinstance(weights, list) else [weights] * len(stack.loras)
    if len(values) != len(stack.loras):
        raise GridError(origin, f"weights {weights} has {len(values)} values but stack '{stack.name}' has "
                                f"{len(stack.loras)} LoRA(s)")
    out = []
    for lora, w in zip(stack.loras, values):
        out.append(Lora(source=lora.source, weight=w, name=lora.name, blocks=lora.blocks, start=lora.start, end=lora.end,
                        region=lora.region, prompt=lora.prompt))
    return out


def build_stack(name: str, entries: Sequence[str | Mapping[str, Any]], *, base_dir: Path | None,
                lora_dir: Path | None, origin: str, locate=lambda text: None, policy: PathPolicy | None = None) -> Stack:
    """Parse and resolve one LoRA stack; every file must exist (checked before anything renders).

    With ``policy`` (a grid file) sources resolve only inside the folders it allows (:mod:`studio.path_policy`);
    without (LoRAs the user typed as options) any path the user gave is used."""
    loras, sources, concepts = [], [], {}
    for entry in entries:
        concept = None
        if isinstance(entry, Mapping):
            entry = dict(entry)
            unknown = sorted(set(entry) - LORA_KEYS)
            if unknown:
                raise GridError(origin, f"LoRA entry has unknown keys {unknown} (valid: {sorted(LORA_KEYS)})",
                                locate(unknown[0]))
            if "source" not in entry:
                raise GridError(origin, f"LoRA entry {entry} needs a 'source'", locate("loras"))
            concept = entry.pop("concept", None)
        mask = None
        if policy is not None and isinstance(entry, str):  # a mask region opens a file: only through the policy
            entry, mask = _mask_region_through(policy, entry, origin, locate)
        try:
            lora = Lora.parse(entry)
            if mask is not None:
                lora.region = mask
                lora.__post_init__()
        except StudioError as e:
            raise GridError(origin, str(e), locate(str(entry.get("source") if isinstance(entry, dict) else entry))) from None
        source_text = str(lora.source)
        lora.source = _resolve(source_text, base_dir, lora_dir, origin, locate, policy)
        if any(lora.label == other.label for other in loras):
            raise GridError(origin, f"two LoRAs are called '{lora.label}' in stack '{name}'; give one a name",
                            locate(source_text))
        loras.append(lora)
        sources.append(source_text)
        if concept:
            concepts[lora.label] = str(concept)
    return Stack(name=name, loras=loras, sources=sources, concepts=concepts)


def _mask_region_through(policy: PathPolicy, entry: str, origin: str, locate) -> tuple[str, str | None]:
    """``entry`` without a ``region=`` naming a mask file, and that file resolved through ``policy``."""
    from fusion.region_masks import is_mask_file

    fields = entry.split(":")
    for i, item in enumerate(fields):
        if item.strip().startswith("region=") and is_mask_file(item.split("=", 1)[1].strip()):
            text = item.split("=", 1)[1].strip()
            try:
                resolved = str(policy.resolve(text, f"the grid {Path(origin).name}"))
            except LoraFileError as e:
                raise GridError(origin, f"region mask {e}", locate(text)) from None
            return ":".join(fields[:i] + fields[i + 1:]), resolved
    return entry, None


def _resolve(source: str, base_dir: Path | None, lora_dir: Path | None, origin: str, locate,
             policy: PathPolicy | None = None) -> str:
    if policy is not None:
        try:
            return str(policy.resolve(source, f"the grid {Path(origin).name}"))
        except LoraFileError as e:
            raise GridError(origin, f"LoRA {e}", locate(source)) from None
    if base_dir is not None and lora_dir is None and not Path(source).is_absolute():
        candidate = base_dir / source
        if candidate.exists():
            return str(candidate.resolve())
    try:
        return str(resolve_source(source, lora_dir))
    except LoraFileError as e:
        raise GridError(origin, f"LoRA {e}", locate(source)) from None


# ---------------------------------------------------------------------------------------------- TOML grids
class TomlLines:
    """Line numbers for keys and values of a TOML text (tomllib keeps none), for error messages.

    Table positions are indexed once and key lookups are remembered, so a grid of many tables costs time linear
    in its length (each table's lines are scanned once per distinct key asked for)."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.tables: list[tuple[int, str]] = []  # (line number, header name)
        self.starts: list[int] = []              # every table's first line, ascending
        self.by_name: dict[str, list[int]] = {}
        header = re.compile(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
        for number, line in enumerate(self.lines, 1):
            if line.lstrip().startswith("["):
                m = header.match(line)
                if m:
                    self.tables.append((number, m.group(1)))
                    self.starts.append(number)
                    self.by_name.setdefault(m.group(1), []).append(number)
        self._memo: dict[tuple, int | None] = {}

    def table_range(self, table: str | None, index: int = 0) -> tuple[int, int]:
        if table is None:  # the top level: up to the first table
            return 1, (self.starts[0] - 1 if self.starts else len(self.lines))
        starts = self.by_name.get(table)
        if not starts:
            return 1, len(self.lines)
        start = starts[min(index, len(starts) - 1)]
        following = bisect.bisect_right(self.starts, start)
        return start, (self.starts[following] - 1 if following < len(self.starts) else len(self.lines))

    def key(self, key: str, table: str | None = None, index: int = 0) -> int | None:
        memo = ("key", key, table, index)
        if memo not in self._memo:
            start, end = self.table_range(table, index)
            pattern = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=")
            found = next((n for n in range(start, end + 1) if pattern.search(self.lines[n - 1])), None)
            self._memo[memo] = found if found is not None else (start if table else None)
        return self._memo[memo]

    def text(self, needle: str, table: str | None = None, index: int = 0) -> int | None:
        start, end = self.table_range(table, index) if table else (1, len(self.lines))
        for number in range(start, end + 1):
            if needle in self.lines[number - 1]:
                return number
        return None


def _check_keys(data: Mapping[str, Any], known: set[str], where: str, origin: str, line) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise GridError(origin, f"unknown key '{unknown[0]}' in {where} (valid: {', '.join(sorted(known))})",
                        line(unknown[0]))


def _as_list(value: Any, key: str, origin: str, line: int | None) -> list:
    if isinstance(value, list):
        if not value:
            raise GridError(origin, f"'{key}' is an empty list", line)
        return value
    return [value]


def load_grid(path: str | Path, *, allow: Sequence[str | Path] = (), limits: Limits = DEFAULT_LIMITS,
              lora_dirs: Sequence[str | Path] = ()) -> tuple[list[BatchItem], str]:
    """Read a TOML grid; returns its items and its model. Every error names the file and line.

    LoRA paths resolve inside the grid's folder, the LoRA library folders (``lora_dirs``, the grid's own
    ``lora_dir`` when that lies in an allowed folder, the shipped LoRAs) and the ``allow`` folders only
    (:class:`studio.path_policy.PathPolicy`); every setting is checked against ``limits`` before anything loads.
    """
    path = Path(path)
    origin = str(path)
    try:
        size = path.stat().st_size
        if size > MAX_GRID_CHARS:
            raise GridError(origin, f"{size} bytes is more than a grid may have ({MAX_GRID_CHARS})")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GridError(origin, f"cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise GridError(origin, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise GridError(origin, "invalid TOML (nested too deeply)") from None
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        line = int(m.group(1)) if m else (len(text.splitlines()) if "end of document" in str(e) else None)
        raise GridError(origin, f"invalid TOML ({e})", line) from None
    where = TomlLines(text)
    _check_keys(data, TOP_KEYS, "the grid", origin, lambda k: where.key(k))
    if not isinstance(data.get("model"), str):
        raise GridError(origin, "the grid needs model = \"...\" (tiny-sdxl, a Hub id, a folder or a .safetensors file)",
                        where.key("model"))
    axes_data = data.get("axes", {})
    if not isinstance(axes_data, dict):
        raise GridError(origin, "[axes] must be a table", where.key("axes"))
    _check_keys(axes_data, AXIS_KEYS, "[axes]", origin, lambda k: where.key(k, "axes"))
    for key in ("seed", "steps", "guidance", *sorted(MODE_AXIS_KEYS)):
        if key in data and key in axes_data:
            raise GridError(origin, f"'{key}' is given both at the top and under [axes]; keep one", where.key(key, "axes"))

    def axis(key: str, cast, default):
        if key in axes_data:
            values, line = axes_data[key], where.key(key, "axes")
        elif key in data:
            values, line = data[key], where.key(key)
        else:
            return default
        try:
            return [cast(v) for v in _as_list(values, key, origin, line)]
        except (TypeError, ValueError):
            raise GridError(origin, f"'{key}' must hold {cast.__name__} values, got {values!r}", line) from None

    strategies = []
    for spec in _as_list(axes_data.get("strategy", "merge"), "strategy", origin, where.key("strategy", "axes")):
        name = spec if isinstance(spec, str) else (spec.get("name") if isinstance(spec, dict) else spec)
        try:
            strategies.append(StrategyChoice.parse(spec))
        except StudioError as e:
            raise GridError(origin, str(e), where.text(f'"{str(name).split(":")[0]}', "axes") or
                            where.key("strategy", "axes")) from None
    labels = [s.label for s in strategies]
    if len(set(labels)) != len(labels):
        raise GridError(origin, f"strategy labels repeat: {labels}; give tables a distinct 'label'",
                        where.key("strategy", "axes"))
    weights_line = where.key("weights", "axes")
    weights = []
    for value in _as_list(axes_data.get("weights", [None]), "weights", origin, weights_line):
        if value is None:
            weights.append(None)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            weights.append(float(value))
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            weights.append([float(v) for v in value])
        else:
            raise GridError(origin, f"a weights value is a number or a list of numbers (one per LoRA), got {value!r}",
                            weights_line)
    report = data.get("report", {})
    if not isinstance(report, dict):
        raise GridError(origin, "[report] must be a table", where.key("report"))
    _check_keys(report, REPORT_KEYS, "[report]", origin, lambda k: where.key(k, "report"))
    columns = report.get("columns")
    if columns is not None and columns not in COLUMN_AXES:
        raise GridError(origin, f"[report] columns must be one of {COLUMN_AXES}, got {columns!r}",
                        where.key("columns", "report"))
    axes = Axes(strategies=strategies, seeds=axis("seed", int, [0]), weights=weights,
                steps=axis("steps", int, [None]), guidance=axis("guidance", float, [None]), columns=columns,
                strengths=_mode_axis(axis, "strength", origin, where),
                controlnet_scales=_mode_axis(axis, "controlnet_scale", origin, where))

    base_dir = path.resolve().parent
    policy = PathPolicy(folder=base_dir, libraries=[Path(d) for d in lora_dirs], allowed=[Path(a) for a in allow])
    lora_dir = data.get("lora_dir")
    if lora_dir is not None and not isinstance(lora_dir, str):
        raise GridError(origin, "lora_dir must be a folder name", where.key("lora_dir"))
    lora_dir = (base_dir / lora_dir).resolve() if lora_dir else None
    if lora_dir is not None:
        if not policy.permits(lora_dir):
            raise GridError(origin, "lora_dir is outside the folders the grid may read (its own folder, the LoRA "
                                    "library, --allow-path DIR)", where.key("lora_dir"))
        policy = policy.with_library(lora_dir)
    stacks = _grid_stacks(data, where, origin, base_dir, lora_dir, policy)
    prompts = _grid_prompts(data, where, origin)
    _grid_inputs(data, prompts, axes, where, origin, policy)
    negative = data.get("negative", "")
    try:
        width = int(data["width"]) if "width" in data else None
        height = int(data["height"]) if "height" in data else None
    except (TypeError, ValueError):
        raise GridError(origin, "width and height must be integers", where.key("width") or where.key("height")) from None
    if not isinstance(negative, str):
        raise GridError(origin, "negative must be text", where.key("negative"))
    items = expand(data["model"], prompts, stacks, axes, origin=origin, negative=negative, width=width,
                   height=height, scheduler=data.get("scheduler"), limits=limits)
    return items, data["model"]


def _mode_axis(axis, key: str, origin: str, where: TomlLines) -> list[float | None]:
    """``strength`` / ``controlnet_scale`` values (top-level or an [axes] list), each checked as compose checks it."""
    from pipelines.mode_inputs import check_conditioning_scale, check_strength

    check = check_strength if key == "strength" else check_conditioning_scale
    values = axis(key, lambda v: v, [None])
    try:
        return [None if v is None else check(v) for v in values]
    except StudioError as e:
        raise GridError(origin, f"'{key}': {e}", where.key(key, "axes") or where.key(key)) from None


def _grid_inputs(data, prompts: list[PromptSpec], axes: Axes, where: TomlLines, origin: str,
                 policy: PathPolicy) -> None:
    """Resolve, check and hash every prompt's input images and the ControlNet (:mod:`studio.grid_inputs`)."""
    state = {"prompt": None}

    def fail(problem: str, key: str) -> GridError:
        index = state["prompt"]
        line = (where.key(key, "prompts", index) if index is not None else None) or where.key(key) \
            or where.key(key, "axes")
        return GridError(origin, problem, line)

    resolver = InputResolver(policy, origin, fail)
    for index, prompt in enumerate(prompts):
        entry = data["prompts"][index] if isinstance(data["prompts"][index], dict) else {}
        state["prompt"] = index if any(k in entry for k in ("image", "mask", "control_image")) else None
        prompt.inputs = resolver.inputs(data, entry)
        check_mode_axes(prompt.inputs, axes.strengths, axes.controlnet_scales, fail)


def _grid_stacks(data, where: TomlLines, origin: str, base_dir: Path, lora_dir: Path | None,
                 policy: PathPolicy | None = None) -> list[Stack]:
    if "stacks" in data and "loras" in data:
        raise GridError(origin, "give either top-level 'loras' (one stack) or [[stacks]], not both", where.key("loras"))
    if "loras" in data:
        if not isinstance(data["loras"], list):
            raise GridError(origin, "'loras' must be a list", where.key("loras"))
        return [build_stack("stack", data["loras"], base_dir=base_dir, lora_dir=lora_dir, origin=origin,
                            locate=lambda t: where.text(t) or where.key("loras"), policy=policy)]
    raw = data.get("stacks", [])
    if not isinstance(raw, list):
        raise GridError(origin, "[[stacks]] must be an array of tables", where.key("stacks"))
    if not raw:
        return [Stack(name="no LoRA", loras=[], sources=[], concepts={})]
    stacks = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise GridError(origin, f"stack #{i + 1} must be a table with 'name' and 'loras'", where.key("stacks"))
        _check_keys(entry, STACK_KEYS, f"stack #{i + 1}", origin, lambda k: where.key(k, "stacks", i))
        loras = entry.get("loras", [])
        if not isinstance(loras, list):
            raise GridError(origin, f"stack #{i + 1}: 'loras' must be a list", where.key("loras", "stacks", i))
        name = str(entry.get("name", f"stack {i + 1}"))
        stacks.append(build_stack(name, loras, base_dir=base_dir, lora_dir=lora_dir, origin=origin,
                                  locate=lambda t, i=i: where.text(t, "stacks", i) or where.key("loras", "stacks", i),
                                  policy=policy))
    names = [s.name for s in stacks]
    if len(set(names)) != len(names):
        raise GridError(origin, f"stack names repeat: {names}", where.key("name", "stacks"))
    return stacks


def _grid_prompts(data, where: TomlLines, origin: str) -> list[PromptSpec]:
    raw = data.get("prompts")
    if not isinstance(raw, list) or not raw:
        raise GridError(origin, "the grid needs [[prompts]] with text = \"...\" (or prompts = [\"...\", ...])",
                        where.key("prompts"))
    prompts = []
    for i, entry in enumerate(raw):
        line = where.table_range("prompts", i)[0] if where.key("prompts") is None else where.key("prompts")
        if isinstance(entry, str):
            entry = {"text": entry}
        if not isinstance(entry, dict):
            raise GridError(origin, f"prompt #{i + 1} must be a string or a table", line)
        _check_keys(entry, PROMPT_KEYS, f"prompt #{i + 1}", origin, lambda k: where.key(k, "prompts", i))
        text = entry.get("text")
        if not isinstance(text, str) or not text.strip():
            raise GridError(origin, f"prompt #{i + 1} needs a non-empty text", where.key("text", "prompts", i) or line)
        concepts = entry.get("concepts", {})
        if not isinstance(concepts, dict) or not all(isinstance(v, str) for v in concepts.values()):
            raise GridError(origin, f"prompt #{i + 1}: concepts must map LoRA names to texts",
                            where.key("concepts", "prompts", i))
        negative = entry.get("negative")
        prompts.append(PromptSpec(text=text.strip(), negative=None if negative is None else str(negative),
                                  concepts=dict(concepts),
                                  origin=f"{origin}:{where.key('concepts', 'prompts', i) or line}"))
    return prompts
