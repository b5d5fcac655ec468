"""Plain prompt lists for ``studio batch``: TXT, CSV or JSONL, one prompt per line or row.

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``.csv``: a header with a ``prompt`` column, optionally ``negative`` and ``concept:<LoRA name>`` columns.
* ``.jsonl``: one object per line: ``{"prompt": ..., "negative": ..., "concepts": {"<LoRA name>": ...}}``.

LoRAs, strategies, seeds, steps and guidance come from command-line options (:func:`load_prompt_list`) and
form the same axes as a TOML grid (see :mod:`studio.grid`). A broken row stops everything before any
rendering, naming the file and line.
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
MAX_LIST_BYTES = 16 * 1024 * 1024  # read only below this size; every reader is one linear pass


def read_prompts(path: str | Path) -> list[PromptSpec]:
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


def _txt(text: str, origin: str) -> list[PromptSpec]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(PromptSpec(text=line, origin=f"{origin}:{number}"))
    return out


def _csv(text: str, origin: str) -> list[PromptSpec]:
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
    unknown = [h for h in header if h not in ("prompt", "negative") and not h.startswith("concept:")]
    if unknown:
        raise GridError(origin, f"unknown CSV column(s) {unknown}; use prompt, negative, concept:<LoRA name>", 1)
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
        out.append(PromptSpec(text=prompt, negative=negative.strip() if negative is not None else None,
                              concepts=concepts, origin=f"{origin}:{number}"))
    return out


def _jsonl(text: str, origin: str) -> list[PromptSpec]:
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
        unknown = sorted(set(data) - {"prompt", "negative", "concepts"})
        if unknown:
            raise GridError(origin, f"unknown key(s) {unknown}; use prompt, negative, concepts", number)
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise GridError(origin, "needs a non-empty 'prompt' string", number)
        concepts = data.get("concepts", {})
        if not isinstance(concepts, dict) or not all(isinstance(v, str) for v in concepts.values()):
            raise GridError(origin, "'concepts' must map LoRA names to texts", number)
        negative = data.get("negative")
        if negative is not None and not isinstance(negative, str):
            raise GridError(origin, "'negative' must be a string", number)
        out.append(PromptSpec(text=prompt.strip(), negative=negative, concepts=concepts, origin=f"{origin}:{number}"))
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
) -> list[BatchItem]:
    """Items for a prompt list with the LoRA stack and axes given as options (``--lora``, ``--strategy``...)."""
    prompts = read_prompts(path)
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
    return expand(model, prompts, [stack], axes, origin=str(path), negative=negative, width=width, height=height,
                  scheduler=scheduler, limits=limits)
