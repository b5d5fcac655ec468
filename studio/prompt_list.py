"""Plain prompt lists for ``studio batch``: TXT, CSV or JSONL, one prompt per line or row.

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``.csv``: a header with a ``prompt`` column, optionally ``negative``, ``concept:<LoRA name>`` and the input
  image columns ``image``, ``mask``, ``control_image`` (an empty cell: the options' image, if any).
* ``.jsonl``: one object per line: ``{"prompt": ..., "negative": ..., "concepts": {"<LoRA name>": ...},
  "image": ..., "mask": ..., "control_image": ...}``.

LoRAs, strategies, seeds, steps and guidance come from command-line options (:func:`load_prompt_list`) and
form the same axes as a TOML grid (see :mod:`studio.grid`); so do the mode inputs for every row (``--image``,
``--mask``, ``--control-image``, ``--controlnet``, ``--strength``, ``--controlnet-scale``, ``--control-lora``), a row's own images
replacing the options'. Input files resolve against the list's folder and ``--allow-path`` folders and are checked
and hashed as a grid's are (:mod:`studio.grid_inputs`). A broken row stops everything before any rendering,
naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from pipelines.errors import StudioError

from .grid import Axes, BatchItem, GridError, PromptSpec, StrategyChoice, build_stack, expand
from .settings import DEFAULT_LIMITS, Limits

SUFFIXES = (".txt", ".csv", ".jsonl")
INPUT_KEYS = ("image", "mask", "control_image")  # a row's own input images (studio.grid_inputs.IMAGE_KEYS)
MAX_LIST_BYTES = 16 * 1024 * 1024  # read only below this size; every reader is one linear pass


def read_prompts(path: str | Path) -> list[PromptSpec]:
    return [spec for spec, _ in read_rows(path)]


def read_rows(path: str | Path) -> list[tuple[PromptSpec, dict[str, str]]]:
    """Each row's prompt and its own input images (``image`` / ``mask`` / ``control_image`` as written)."""
    path = Path(path)
    origin = str(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise GridError(origin, f"a batch input is a .toml grid or a prompt list ({', '.join(SUFFIXES)})")
    try:
        size = path.stat().st_size
        if size > MAX_LIST_BYTES:
            raise GridError(origin, f"{size} bytes is more than a prompt list may have ({MAX_LIST_BYTES})")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GridError(origin, f"cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise GridError(origin, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    reader = {".txt": _txt, ".csv": _csv, ".jsonl": _jsonl}[suffix]
    prompts = reader(text, origin)
    if not prompts:
        raise GridError(origin, "holds no prompt")
    return prompts


def _txt(text: str, origin: str) -> list[tuple[PromptSpec, dict[str, str]]]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append((PromptSpec(text=line, origin=f"{origin}:{number}"), {}))
    return out


def _csv(text: str, origin: str) -> list[tuple[PromptSpec, dict[str, str]]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return []
    except csv.Error as e:
        raise GridError(origin, f"broken CSV header ({e})", 1) from None
    header = [h.strip() for h in header]
    if "prompt" not in header:
        raise GridError(origin, f"the CSV header needs a 'prompt' column (found {header})", 1)
    unknown = [h for h in header if h not in ("prompt", "negative", *INPUT_KEYS) and not h.startswith("concept:")]
    if unknown:
        raise GridError(origin, f"unknown CSV column(s) {unknown}; use prompt, negative, concept:<LoRA name>, "
                                f"{', '.join(INPUT_KEYS)}", 1)
    out = []
    row_start = 2
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise GridError(origin, f"broken CSV row ({e})", row_start) from None
        number, row_start = row_start, reader.line_num + 1
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise GridError(origin, f"row has {len(row)} field(s), the header has {len(header)}", number)
        values = dict(zip(header, row))
        prompt = values["prompt"].strip()
        if not prompt:
            raise GridError(origin, "empty prompt", number)
        concepts = {k.removeprefix("concept:").strip(): v.strip() for k, v in values.items()
                    if k.startswith("concept:") and v.strip()}
        negative = values.get("negative")
        inputs = {k: values[k].strip() for k in INPUT_KEYS if values.get(k, "").strip()}
        out.append((PromptSpec(text=prompt, negative=negative.strip() if negative is not None else None,
                               concepts=concepts, origin=f"{origin}:{number}"), inputs))
    return out


def _jsonl(text: str, origin: str) -> list[tuple[PromptSpec, dict[str, str]]]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise GridError(origin, f"invalid JSON ({e.msg} at column {e.colno})", number) from None
        except RecursionError:
            raise GridError(origin, "invalid JSON (nested too deeply)", number) from None
        if isinstance(data, str):
            data = {"prompt": data}
        if not isinstance(data, dict):
            raise GridError(origin, "each line must be an object with a 'prompt' (or a string)", number)
        unknown = sorted(set(data) - {"prompt", "negative", "concepts", *INPUT_KEYS})
        if unknown:
            raise GridError(origin, f"unknown key(s) {unknown}; use prompt, negative, concepts, "
                                    f"{', '.join(INPUT_KEYS)}", number)
        bad = [k for k in INPUT_KEYS if k in data and (not isinstance(data[k], str) or not data[k].strip())]
        if bad:
            raise GridError(origin, f"'{bad[0]}' must be an image file path", number)
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise GridError(origin, "needs a non-empty 'prompt' string", number)
        concepts = data.get("concepts", {})
        if not isinstance(concepts, dict) or not all(isinstance(v, str) for v in concepts.values()):
            raise GridError(origin, "'concepts' must map LoRA names to texts", number)
        negative = data.get("negative")
        if negative is not None and not isinstance(negative, str):
            raise GridError(origin, "'negative' must be a string", number)
        out.append((PromptSpec(text=prompt.strip(), negative=negative, concepts=concepts, origin=f"{origin}:{number}"),
                    {k: data[k].strip() for k in INPUT_KEYS if k in data}))
    return out


def load_prompt_list(
    path: str | Path,
    *,
    model: str,
    loras: Sequence[str] = (),
    concepts: dict[str, str] | None = None,
    strategies: Sequence[str] = ("merge",),
    seeds: Sequence[int] = (0,),
    steps: Sequence[int] = (),
    guidance: Sequence[float] = (),
    negative: str = "",
    width: int | None = None,
    height: int | None = None,
    scheduler: str | None = None,
    lora_dir: str | Path | None = None,
    limits: Limits = DEFAULT_LIMITS,
    image: str | None = None,
    mask: str | None = None,
    control_image: str | None = None,
    controlnet: str | None = None,
    strength: float | None = None,
    controlnet_scale: float | None = None,
    allow_path: Sequence[str | Path] = (),
    control_lora: str | None = None,
) -> list[BatchItem]:
    """Items for a prompt list with the LoRA stack and axes given as options (``--lora``, ``--strategy``...);
    ``image`` ... ``controlnet_scale``: the mode inputs of every row (a row's own images replace these)."""
    rows = read_rows(path)
    prompts = [spec for spec, _ in rows]
    try:
        choices = [StrategyChoice.parse(s) for s in (strategies or ["merge"])]
    except StudioError as e:
        raise GridError("--strategy", str(e)) from None
    labels = [c.label for c in choices]
    if len(set(labels)) != len(labels):
        raise GridError("--strategy", f"the same strategy is given twice: {labels}")
    stack = build_stack("stack", list(loras), base_dir=None, lora_dir=Path(lora_dir) if lora_dir else None,
                        origin="--lora")
    names = {lora.label for lora in stack.loras}
    unknown = sorted(set(concepts or {}) - names)
    if unknown:
        raise GridError("--concept", f"no --lora is called {unknown} (LoRA names: {sorted(names)})")
    stack.concepts.update(concepts or {})
    axes = Axes(strategies=choices, seeds=list(seeds) or [0], steps=list(steps) or [None],
                guidance=list(guidance) or [None])
    top = {k: v for k, v in (("image", image), ("mask", mask), ("control_image", control_image),
                             ("controlnet", controlnet), ("control_lora", control_lora)) if v is not None}
    if controlnet_scale is not None and control_lora is not None:
        raise GridError("--controlnet-scale", "a control LoRA has its weight in --control-lora PATH:WEIGHT")
    if top or strength is not None or controlnet_scale is not None or any(raw for _, raw in rows):
        _resolve_inputs(path, rows, top, axes, strength, controlnet_scale, lora_dir, allow_path)
    return expand(model, prompts, [stack], axes, origin=str(path), negative=negative, width=width, height=height,
                  scheduler=scheduler, limits=limits)


_OPTION = {"image": "--image", "mask": "--mask", "control_image": "--control-image", "controlnet": "--controlnet",
           "strength": "--strength", "controlnet_scale": "--controlnet-scale", "control_lora": "--control-lora"}


def _resolve_inputs(path, rows, top, axes: Axes, strength, controlnet_scale, lora_dir, allow_path) -> None:
    """Every row's input images and the ControlNet, resolved, checked and hashed as a grid's
    (:class:`studio.grid_inputs.InputResolver`); errors name the row's line, or the option."""
    from pipelines.mode_inputs import check_conditioning_scale, check_strength

    from .grid_inputs import InputResolver, check_mode_axes
    from .path_policy import PathPolicy

    origin = str(path)
    policy = PathPolicy(folder=Path(path).resolve().parent, libraries=[Path(lora_dir)] if lora_dir else [],
                        allowed=[Path(a) for a in allow_path])
    state: dict = {"line": None, "own": ()}

    def fail(problem: str, key: str) -> GridError:
        if key in state["own"]:
            return GridError(origin, problem, state["line"])
        return GridError(_OPTION.get(key, origin), problem)

    for option, value, check in (("--strength", strength, check_strength),
                                 ("--controlnet-scale", controlnet_scale, check_conditioning_scale)):
        try:
            checked = [None if value is None else check(value)]
        except StudioError as e:
            raise GridError(option, str(e)) from None
        setattr(axes, "strengths" if option == "--strength" else "controlnet_scales", checked)
    resolver = InputResolver(policy, origin, fail)
    for spec, raw in rows:
        state["line"] = int(spec.origin.rsplit(":", 1)[1])
        state["own"] = tuple(raw)
        spec.inputs = resolver.inputs(top, raw)
        state["own"] = ()
        check_mode_axes(spec.inputs, axes.strengths, axes.controlnet_scales, fail)
