"""Batch outputs built from the manifest alone: ``scores.csv``, ``report.html`` and one grid PNG per group.

The report is one self-contained HTML page (inline CSS and SVG, no script, no network): a summary table per
strategy (CLIPScore mean ± std over all its images, and per LoRA concept), a bar chart of the same, then for
each prompt (and each setting that is neither the row nor the column axis) an X/Y grid, rows = strategies,
columns = seeds or weights, with the CLIPScores under every image. Images are linked relative to the folder,
or inlined as data URIs (``inline_images=True``) so the page travels alone. Templates: ``studio/templates``.

Images of the tiny world models also get the concept judge's verdicts (:mod:`studio.world.verdicts`): whether
each of their world LoRAs' concepts shows, per image, per strategy and in the CSV, because the world's tiny CLIP
reads shapes at chance. The summary chart fits a 1400 px window (``MAX_CHART_WIDTH``) however many strategies.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import statistics
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from jinja2 import Environment, PackageLoader, select_autoescape

from .grid import slug
from .scoring import WORLD_MODELS
from .recipe import atomic_write_bytes
from .sheets import Cell, contact_sheet

MAX_CHART_WIDTH = 1360  # px: the summary chart fits a 1400 px window (the page's max width)
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def _env() -> Environment:
    return Environment(loader=PackageLoader("studio", "templates"), autoescape=select_autoescape(["html", "j2"]),
                       trim_blocks=True, lstrip_blocks=True)


def _ok(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == "ok"]


def _position(record: dict[str, Any]) -> tuple:
    item = record.get("item", {})
    return (item.get("prompt_index", 0), item.get("position", 0), record["id"])


def mean_std(values: list[float]) -> tuple[float, float, int]:
    if not values:
        return (float("nan"), float("nan"), 0)
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def strategy_means(records: Iterable[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """CLIPScore (mean, std, n) per strategy label over the scored ``ok`` records."""
    by: dict[str, list[float]] = {}
    for r in sorted(_ok(records), key=_position):
        clip = (r.get("scores") or {}).get("clip")
        by.setdefault(r["item"]["strategy"], [])
        if clip is not None:
            by[r["item"]["strategy"]].append(float(clip))
    return {k: mean_std(v) for k, v in by.items()}


# ------------------------------------------------------------------------------------------------ CSV
def scores_table(records: Iterable[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    records = sorted(records, key=_position)
    concepts = list(dict.fromkeys(name for r in records for name in (r.get("scores") or {}).get("concepts", {})))
    header = ["id", "status", "file", "prompt", "strategy", "row", "column", "stack", "seed", "steps", "guidance",
              "weights", "clip_score", *[f"concept:{c}" for c in concepts], "judge", "scorer", "seconds", "error"]
    rows = []
    for r in records:
        item, recipe, scores = r.get("item", {}), r.get("recipe") or {}, r.get("scores") or {}
        rows.append([
            r["id"], r.get("status"), r.get("file") or "", recipe.get("prompt", item.get("group", "")),
            item.get("strategy", ""), item.get("row", ""), item.get("column", ""), item.get("stack", ""),
            recipe.get("seed", ""), recipe.get("steps", ""), recipe.get("guidance", ""),
            "/".join(f"{w:g}" for w in item.get("weights", [])),
            "" if scores.get("clip") is None else f"{scores['clip']:.4f}",
            *["" if scores.get("concepts", {}).get(c) is None else f"{scores['concepts'][c]:.4f}" for c in concepts],
            " ".join(f"{k}:{int(v)}" for k, v in (r.get("judge") or {}).items()), r.get("scorer", ""), (r.get("timings") or {}).get("item_s", ""), r.get("error", ""),
        ])
    return header, rows


def write_scores_csv(folder: Path, records: Iterable[dict[str, Any]]) -> Path:
    header, rows = scores_table(records)
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path = folder / "scores.csv"
    atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------------ report data
@dataclass
class GridCell:
    record: dict[str, Any] | None
    src: str = ""
    clip: float | None = None
    concepts: dict[str, float] = field(default_factory=dict)
    failed: str = ""
    judge: dict[str, bool] = field(default_factory=dict)  # tiny world: LoRA concept -> shown (concept judge)

    @property
    def caption(self) -> str:
        if self.record is None:
            return "missing"
        if self.failed:
            return "failed"
        first = "CLIP —" if self.clip is None else f"CLIP {self.clip:.1f}"
        second = " · ".join(f"{k} {v:.1f}" for k, v in self.concepts.items())
        third = "judge: " + " ".join(f"{k} {'✓' if v else '✗'}" for k, v in self.judge.items()) if self.judge else ""
        return "\n".join(line for line in (first, second, third) if line)

    @property
    def caption_line(self) -> str:
        return self.caption.replace("\n", " · ")


@dataclass
class GridGroup:
    title: str
    prompt: str
    rows: list[str]
    columns: list[str]
    cells: list[list[GridCell]]
    row_means: list[str]
    sheet: str = ""
    anchor: str = ""


def _image_src(folder: Path, file: str, inline: bool) -> str:
    if not inline:
        return file
    return "data:image/png;base64," + base64.b64encode((folder / file).read_bytes()).decode("ascii")


def build_groups(folder: Path, records: list[dict[str, Any]], inline: bool) -> list[GridGroup]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in sorted(records, key=_position):
        groups.setdefault((r["item"].get("prompt_index", 0), r["item"]["group"]), []).append(r)
    out = []
    for (index, title), members in groups.items():
        rows = list(dict.fromkeys(r["item"]["row"] for r in members))
        columns = list(dict.fromkeys(r["item"]["column"] for r in members))
        lookup = {(r["item"]["row"], r["item"]["column"]): r for r in members}
        cells, means = [], []
        for row in rows:
            line = []
            for column in columns:
                r = lookup.get((row, column))
                if r is None:
                    line.append(GridCell(record=None))
                elif r.get("status") != "ok":
                    line.append(GridCell(record=r, failed=r.get("error", "failed")))
                else:
                    scores = r.get("scores") or {}
                    line.append(GridCell(record=r, src=_image_src(folder, r["file"], inline), clip=scores.get("clip"),
                                         concepts=scores.get("concepts", {}), judge=r.get("judge") or {}))
            cells.append(line)
            values = [c.clip for c in line if c.clip is not None]
            mean, std, n = mean_std(values)
            means.append(f"{mean:.1f} ± {std:.1f}" if n else "—")
        prompt = (members[0].get("recipe") or {}).get("prompt", title)
        anchor = f"{slug(title, 40)}-{hashlib.sha256(f'{index}|{title}'.encode()).hexdigest()[:6]}"
        out.append(GridGroup(title=title, prompt=prompt, rows=rows, columns=columns, cells=cells, row_means=means,
                             anchor=anchor, sheet=f"grids/{anchor}.png"))
    return out


def summary_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Per strategy: images, failed, CLIPScore and per-concept (mean, std, n)."""
    concepts = list(dict.fromkeys(n for r in _ok(records) for n in (r.get("scores") or {}).get("concepts", {})))
    strategies = list(dict.fromkeys(r["item"]["strategy"] for r in sorted(records, key=_position)))
    rows = []
    for name in strategies:
        mine = [r for r in records if r["item"]["strategy"] == name]
        ok = _ok(mine)
        clip = [float(r["scores"]["clip"]) for r in ok if (r.get("scores") or {}).get("clip") is not None]
        per_concept = {c: mean_std([float(r["scores"]["concepts"][c]) for r in ok
                                    if c in (r.get("scores") or {}).get("concepts", {})]) for c in concepts}
        judged = [r["judge"] for r in ok if r.get("judge")]
        judge = {"all": (sum(all(j.values()) for j in judged), len(judged)),
                 "concepts": {c: (sum(bool(j.get(c)) for j in judged if c in j), sum(c in j for j in judged))
                              for c in concepts}} if judged else None
        rows.append({"strategy": name, "images": len(ok), "failed": len(mine) - len(ok), "clip": mean_std(clip),
                     "concepts": per_concept, "judge": judge})
    return concepts, rows


def bar_chart(concepts: list[str], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Geometry of an SVG bar chart: per strategy, one bar for the prompt score and one per concept (± std)."""
    series = ["prompt", *concepts]
    values = [[row["clip"], *[row["concepts"][c] for c in concepts]] for row in rows]
    finite = [m + s for line in values for (m, s, n) in line if n]
    if not finite:
        return None
    top = max(finite) * 1.1 or 1.0
    plot_h, gap, left = 220, 14, 48
    # bars narrow so that the chart fits MAX_CHART_WIDTH (a 1400 px window) whatever the number of strategies
    bar_w = max(3.0, min(22.0, ((MAX_CHART_WIDTH - left - 20) / max(len(rows), 1) - gap) / len(series)))
    group_w = len(series) * bar_w + gap
    tilt = group_w < 7 * max(len(row["strategy"]) for row in rows) + 8  # labels wider than their group: slant
    bottom = 16 + (6 * max(len(row["strategy"]) for row in rows) if tilt else 12)
    width = min(MAX_CHART_WIDTH, max(left + len(rows) * group_w + 20, 320))
    bars, labels = [], []
    for g, (row, line) in enumerate(zip(rows, values)):
        x0 = left + g * group_w + gap / 2
        labels.append({"x": round(x0 + len(series) * bar_w / 2, 1), "text": row["strategy"], "tilt": tilt})
        for k, (m, s, n) in enumerate(line):
            if not n:
                continue
            h = plot_h * m / top
            x = x0 + k * bar_w
            bars.append({"x": round(x, 1), "y": round(10 + plot_h - h, 1), "w": round(max(bar_w - 2, 1), 1),
                         "h": round(h, 1), "color": PALETTE[k % len(PALETTE)],
                         "cx": round(x + max(bar_w - 2, 1) / 2, 1),
                         "e1": round(10 + plot_h - plot_h * (m + s) / top, 1),
                         "e2": round(10 + plot_h - plot_h * max(m - s, 0) / top, 1),
                         "title": f"{row['strategy']} · {series[k]}: {m:.2f} ± {s:.2f} (n={n})"})
    ticks = [{"y": round(10 + plot_h - plot_h * t / top, 1), "text": f"{t:g}"} for t in _ticks(top)]
    legend, x, y = [], left, 10 + plot_h + bottom + 4
    for k, name in enumerate(series):  # each label as wide as its text (about 7 px a character), wrapping
        span = 14 + 7 * len(name) + 18
        if x + span > width and x > left:
            x, y = left, y + 18
        legend.append({"name": name, "color": PALETTE[k % len(PALETTE)], "x": round(x, 1), "y": y})
        x += span
    return {"width": width, "height": y + 22, "base": 10 + plot_h, "left": left, "bars": bars,
            "labels": labels, "ticks": ticks, "legend": legend}


def _ticks(top: float) -> list[float]:
    step = next(s for s in (0.5, 1, 2, 5, 10, 20, 50) if top / s <= 6)
    return [i * step for i in range(int(top / step) + 1)]


# ------------------------------------------------------------------------------------------------ writers
def write_sheets(folder: Path, groups: list[GridGroup]) -> None:
    (folder / "grids").mkdir(exist_ok=True)
    for group in groups:
        cells = [[Cell(image=folder / c.record["file"] if c.src else None, caption=c.caption) for c in line]
                 for line in group.cells]
        sheet = contact_sheet(group.title, group.rows, group.columns, cells)
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        atomic_write_bytes(folder / group.sheet, buffer.getvalue())


def render_report(folder: Path, records: list[dict[str, Any]], *, inline_images: bool = False,
                  notes: Iterable[str] = ()) -> tuple[str, list[GridGroup]]:
    ok_or_failed = [r for r in records if "item" in r]
    groups = build_groups(folder, ok_or_failed, inline_images)
    concepts, rows = summary_rows(ok_or_failed)
    failed = [r for r in sorted(ok_or_failed, key=_position) if r.get("status") != "ok"]
    html = _env().get_template("report.html.j2").render(
        folder=folder.name, generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        total=len(_ok(ok_or_failed)), failed=failed, groups=groups, concepts=concepts, summary=rows,
        chart=bar_chart(concepts, rows), scorers=sorted({r["scorer"] for r in ok_or_failed if r.get("scorer")}),
        models=sorted({(r.get("recipe") or {}).get("model", "") for r in ok_or_failed} - {""}),
        judged=any(row["judge"] for row in rows), notes=list(notes),
    )
    return html, groups


def with_world_verdicts(folder: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tiny-world images with the concept judge's verdicts (:mod:`studio.world.verdicts`): the world's tiny CLIP
    reads shapes at chance, so its CLIPScore alone misleads there. Other models' records pass unchanged."""
    if not any((r.get("recipe") or {}).get("model") in WORLD_MODELS and "judge" not in r for r in records):
        return records
    from .world.verdicts import judge_folder

    return judge_folder(folder, records)


def write_outputs(folder: str | Path, records: list[dict[str, Any]], *, inline_images: bool = False,
                  notes: Iterable[str] = ()) -> Path:
    """Write ``scores.csv``, the grid sheets and ``report.html`` (``notes``: paragraphs shown under the summary,
    e.g. the demo's advice); returns the report's path."""
    folder = Path(folder)
    records = with_world_verdicts(folder, records)
    write_scores_csv(folder, records)
    html, groups = render_report(folder, records, inline_images=inline_images, notes=notes)
    write_sheets(folder, groups)
    path = folder / "report.html"
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
