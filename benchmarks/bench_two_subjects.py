"""Two subjects in one image: does a strategy put each subject LoRA in its own place, or do they bleed?

    python benchmarks/bench_two_subjects.py                          # tiny-sdxl, every registered strategy
    python benchmarks/bench_two_subjects.py --family flux --seeds 0 1 2
    python benchmarks/bench_two_subjects.py --strategy merge --strategy composite:reduce=sum
    python benchmarks/bench_two_subjects.py --seeds 0 1 2 3 --strategy clora:masks=every_step --add

Scenes (issue 14): the tiny world's two subject LoRAs, ``zorb`` (a cross) and ``quix`` (a star), asked for side by
side, alone or with a shared style (``striped``) or background (``waves``) LoRA; and, as a reference without
LoRAs, two base shapes side by side (``base`` rows: can the base model draw two objects at all?). The subject
LoRAs are bound to class words, as character LoRAs are (:data:`studio.world.concepts.CLASS_WORDS`: zorb to
``circle``, quix to ``square``), so a scene's prompt is a base prompt: "a small red circle, solid, on a light
background, left, and a small blue square, solid, right". Every strategy renders the same prompt and seeds.
``regional`` (when registered) gets each subject LoRA with its box (``region=left`` / ``region=right``; with the
benchmark option ``region=auto``, ``region=auto``: masks from the cross-attention of its trigger or class word) and
a one-object region prompt in the world's caption grammar (benchmark option ``prompts=none``: no region prompt,
every lane reads the global prompt; ``global=none``: no global prompt, each lane its region prompt alone); the
style/background LoRA stays global. ``clora`` finds
its concepts by their trigger (or class) words in the prompt. Strategies defined for fewer LoRAs than a scene has
(``klora``: two) skip it.

Each image is judged per half by :mod:`studio.world.regions` (the concept judge on each half, re-centred at
native scale, plus a pixel test: is there an object inside the half, or one across the middle?). Per strategy:

* *both right*: the left half shows the left subject and the right half the right subject (these columns, up to
  *colour*, count the plain-background scenes only: on ``waves`` the pixel test cannot find objects, and the judge
  alone reads shapes into an empty waves pattern; the waves scene counts for *background*);
* *subject*: share of halves showing their own subject; *bleed*: share of halves showing the *other* subject;
  *no object*: share of halves with no object; *across*: share of halves cut by one object drawn across the
  middle (neither counts as showing a subject); *noise*: share of halves of plain-background scenes whose image did not
  keep the plain background (noise or garbage; nothing counts as shown there); *colour*: share of halves with
  their own colour;
* *style* / *background*: share of halves of the style / background scenes showing striped / waves;
* *CPU s/image*: process CPU time per image (less sensitive than wall clock to other processes on a shared
  machine; with one torch thread it is the render's own work), the first render of a stack included, so one-off
  merges count; and the ratio to ``merge``.

Results: ``benchmarks/results/two-subjects-<family>.json`` / ``.md`` and a picture (``.png``: the rows of
:data:`GRID_ROWS` that were measured, merge, regional with boxes, with boxes but no region prompts and with
``region=auto``, clora with fixed and per-step masks, on each scene, seed 0); images in ``--work``
(``outputs/two-subjects``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studio.world.concepts import Scene, held_out, pair_caption
from studio.world.regions import HALVES, judge_regions

BASE_LABEL = "base (no LoRA)"
PLAIN = ("light", "dark")  # backgrounds on which the pixel placement test works
REGION_STRATEGIES = ("regional",)  # strategies that take a box per stack entry


@dataclass(frozen=True)
class PairScene:
    """Two small objects, left and right, on one background; ``extra`` is a shared style/background LoRA."""

    left: str  # shape: a subject LoRA's value (zorb, quix) or a base shape
    right: str
    left_color: str
    right_color: str
    background: str = "light"
    texture: str = "solid"
    extra: str | None = None  # "style-striped" | "background-waves" | None

    def scene(self, side: str) -> Scene:
        shape, color = (self.left, self.left_color) if side == "left" else (self.right, self.right_color)
        return Scene(shape=shape, color=color, texture=self.texture, background=self.background, size="small",
                     position=side)

    def caption(self, side: str, family: str | None = None) -> str:
        """One object's caption (a regional lane's prompt), in the single-object grammar; subjects are called as
        ``family``'s LoRAs call them (by the class word they are bound to)."""
        return self.scene(side).caption(family)

    def prompt(self, family: str | None = None) -> str:
        """The two-object prompt, in the grammar the bases were fine-tuned on (:func:`pair_caption`)."""
        return pair_caption(self.scene("left"), self.scene("right"), family)


SCENES = (
    PairScene("zorb", "quix", "red", "blue"),
    PairScene("quix", "zorb", "yellow", "green", background="dark"),
    PairScene("zorb", "quix", "blue", "red", texture="striped", extra="style-striped"),
    PairScene("quix", "zorb", "green", "yellow", background="waves", extra="background-waves"),
)
BASE_SCENES = (
    PairScene("circle", "square", "red", "blue"),
    PairScene("triangle", "circle", "yellow", "green", background="dark"),
)


def lora_file(family: str, name: str) -> str:
    from pipelines.assets import assets_root

    return str(assets_root() / "loras" / f"tiny-{family}" / f"{name}.safetensors")


def stack(scene: PairScene, family: str, strategy: str, region: str = "box", region_prompts: bool = True) -> list[dict]:
    """The scene's LoRAs for ``strategy``: subjects left then right, then the shared LoRA; for regional each subject
    gets its box (``region="box"``: ``left`` / ``right``) or ``auto`` (masks from its trigger word's
    cross-attention) and its one-object region prompt."""
    entries = []
    for side, shape in (("left", scene.left), ("right", scene.right)):
        entry = {"source": lora_file(family, f"subject-{shape}"), "name": f"subject-{shape}"}
        if strategy in REGION_STRATEGIES:
            entry.update(region=side if region == "box" else "auto")
            if region_prompts:
                entry["prompt"] = scene.caption(side, family)
        entries.append(entry)
    if scene.extra:
        entries.append({"source": lora_file(family, scene.extra), "name": scene.extra})
    return entries


def parse_choice(text: str) -> tuple[str, str, dict]:
    """``name[:k=v[:k=v]]`` -> (label, name, params); ``global=none`` (a benchmark option, not a strategy
    parameter) gives the strategy an empty global prompt, so a regional lane's prompt is its region prompt alone."""
    name, *pairs = text.split(":")
    params = dict(p.split("=", 1) for p in pairs)
    label = name + ("" if not params else " " + " ".join(f"{k}={v}" for k, v in params.items()))
    return label, name, params


def global_prompt(scene: PairScene, params: dict, family: str | None = None) -> str:
    """The prompt every strategy gets: the two-object prompt, or nothing with the benchmark option ``global=none``."""
    option = params.pop("global", "full")
    if option not in ("full", "none"):
        raise SystemExit(f"global={option!r}: use full (the two-object prompt) or none (region prompts only)")
    return scene.prompt(family) if option == "full" else ""


def region_option(strategy: str | None, params: dict) -> str:
    """The benchmark option ``region=box|auto`` of a region strategy (boxes by default), taken out of ``params``."""
    option = params.pop("region", "box")
    if option not in ("box", "auto") or (option == "auto" and strategy not in REGION_STRATEGIES):
        raise SystemExit(f"region={option!r}: use box or auto, on {', '.join(REGION_STRATEGIES)} only")
    return option


def region_prompts_option(strategy: str | None, params: dict) -> bool:
    """The benchmark option ``prompts=region|none`` of a region strategy: with ``none`` the subjects get their
    regions but no region prompt, so every lane reads the global prompt alone; taken out of ``params``."""
    option = params.pop("prompts", "region")
    if option not in ("region", "none") or (option == "none" and strategy not in REGION_STRATEGIES):
        raise SystemExit(f"prompts={option!r}: use region or none, on {', '.join(REGION_STRATEGIES)} only")
    return option == "region"


def default_choices() -> list[str]:
    from studio.strategies import REGISTRY

    choices = []
    for name in REGISTRY:
        choices.append(name)
        if name == "composite":
            choices.append("composite:reduce=sum")
        if name in REGION_STRATEGIES:
            choices += [f"{name}:global=none", f"{name}:prompts=none", f"{name}:region=auto",
                        f"{name}:region=auto:prompts=none"]
        if name == "clora":  # the paper's masks, made again at every step; the style LoRA kept global
            choices += ["clora:masks=every_step", "clora:max_concepts=2"]
    return choices


def score(records: list[dict]) -> dict:
    halves = [(r, side) for r in records for side in ("left", "right")]

    def share(test, subset=None) -> float | None:
        chosen = [h for h in halves if subset is None or subset(h[0])]
        return float(np.mean([test(r, side) for r, side in chosen])) if chosen else None

    def own(r, side):
        return r["scene"][side]

    def other(r, side):
        return r["scene"]["right" if side == "left" else "left"]

    def shows(r, side, attribute, value):
        """An object inside the half (pixel test) with that value (judge). On a plain background an unreadable
        border means the image did not draw the plain background it was asked for (noise): nothing is shown."""
        v = r["regions"][side]
        return v["placement"] == "inside" and v["values"][attribute] == value

    def plain(r):
        return r["scene"]["background"] in PLAIN

    judged = [r for r in records if plain(r)]  # subjects are read where the pixel test works (plain backgrounds)
    return {
        "images": len(records),
        "both_right": float(np.mean([all(shows(r, s, "shape", own(r, s)) for s in ("left", "right"))
                                     for r in judged])) if judged else None,
        "subject": share(lambda r, s: shows(r, s, "shape", own(r, s)), plain),
        "bleed": share(lambda r, s: shows(r, s, "shape", other(r, s)) and own(r, s) != other(r, s), plain),
        "no_object": share(lambda r, s: r["regions"][s]["placement"] == "none", plain),
        "crossing": share(lambda r, s: r["regions"][s]["placement"] == "crossing", plain),
        "noise": share(lambda r, s: r["regions"][s]["placement"] == "unknown", plain),
        "colour": share(lambda r, s: shows(r, s, "color", r["scene"][f"{s}_color"]), plain),
        "style": share(lambda r, s: shows(r, s, "texture", "striped"), lambda r: r["scene"]["extra"] == "style-striped"),
        "background": share(lambda r, s: r["regions"][s]["values"]["background"] == "waves",
                             lambda r: r["scene"]["extra"] == "background-waves"),
        "seconds_per_image": float(np.mean([r["seconds"] for r in records])),
    }


def pct(v) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def table(rows: list[dict]) -> str:
    lines = ["| strategy | images | both right | subject | bleed | no object | across | noise | colour | style "
             "| background | CPU s/image | time vs merge |", "|" + "---|" * 13]
    for r in rows:
        ratio = "n/a" if r.get("time_vs_merge") is None else f"{r['time_vs_merge']:.2f}x"
        lines.append(f"| {r['strategy']} | {r['images']} | {pct(r['both_right'])} | {pct(r['subject'])} | "
                     f"{pct(r['bleed'])} | {pct(r['no_object'])} | {pct(r['crossing'])} | {pct(r['noise'])} | {pct(r['colour'])} | {pct(r['style'])} | "
                     f"{pct(r['background'])} | {r['seconds_per_image']:.2f} | {ratio} |")
    return "\n".join(lines)


GRID_ROWS = ("merge", "regional", "regional prompts=none", "regional region=auto", "clora", "clora masks=every_step")


def write_grid(results: Path, work: Path, out: Path, rows=GRID_ROWS, seed: int = 0, scale: int = 3) -> None:
    """A picture for the README: one row per strategy in ``rows`` (those measured), one column per scene, ``seed``'s
    image, upscaled ``scale`` times (nearest), each half labelled with the region judge's shape reading ("?": the pixel test could not read the background)."""
    from PIL import Image, ImageDraw

    payload = json.loads(results.read_text())
    rows = [r for r in rows if r in payload["images"]]
    size, label_w, text_h = 64 * scale, 150, 14
    grid = Image.new("RGB", (label_w + size * len(SCENES), (size + text_h) * len(rows) + text_h), "white")
    draw = ImageDraw.Draw(grid)
    for column, scene in enumerate(SCENES):
        draw.text((label_w + column * size + 4, 1), f"{scene.left} | {scene.right}"
                  + (f" + {scene.extra.split('-')[1]}" if scene.extra else ""), fill="black")
    for row, label in enumerate(rows):
        y = text_h + row * (size + text_h)
        draw.text((4, y + size // 2), label, fill="black")
        for record in payload["images"][label]:
            if record["seed"] != seed:
                continue
            column = next(i for i, sc in enumerate(SCENES) if (sc.left, sc.right, sc.extra) == (
                record["scene"]["left"], record["scene"]["right"], record["scene"]["extra"]))
            image = Image.open(work / record["file"]).convert("RGB").resize((size, size), Image.NEAREST)
            grid.paste(image, (label_w + column * size, y))
            regions = record["regions"]
            words = [regions[s]["values"]["shape"] + ("?" if regions[s]["placement"] == "unknown" else "")
                     if regions[s]["placement"] in ("inside", "unknown") else f"({regions[s]['placement']})"
                     for s in ("left", "right")]
            draw.text((label_w + column * size + 4, y + size + 1), " | ".join(words), fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("sdxl", "flux"), default="sdxl")
    ap.add_argument("--strategy", action="append", help="name[:param=value...] (default: every registered one, "
                                                        "plus composite:reduce=sum)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--work", type=Path, default=ROOT / "outputs" / "two-subjects")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--add", action="store_true", help="add/replace these strategies' rows in the earlier results "
                    "(same seeds and --work; time ratios against that run's merge unless merge runs again)")
    ap.add_argument("--grid-only", action="store_true", help="only (re)draw the picture from earlier results")
    ap.add_argument("--rejudge", action="store_true", help="judge the earlier run's images again (after a change "
                                                           "to the region judge) and rewrite its results")
    args = ap.parse_args(argv)
    stem = args.results / f"two-subjects-{args.family}"
    if args.grid_only:
        write_grid(stem.with_suffix(".json"), args.work / args.family, stem.with_suffix(".png"))
        return
    if args.rejudge:
        rejudge(stem, args.work / args.family)
        return
    torch.set_num_threads(args.threads)

    from pipelines.assets import assets_root
    from studio import Studio
    from studio.strategies import REGISTRY
    from studio.world.judge import load_judge

    for scene in SCENES:  # every LoRA file the scenes name, before anything renders
        for name in [f"subject-{scene.left}", f"subject-{scene.right}"] + [scene.extra] * bool(scene.extra):
            held_out(name)
            if not Path(lora_file(args.family, name)).is_file():
                raise SystemExit(f"missing world LoRA {lora_file(args.family, name)}")
    choices = [parse_choice(c) for c in (args.strategy or default_choices())]
    missing = [name for _, name, _ in choices if name not in REGISTRY]
    if missing:
        raise SystemExit(f"unknown strategies {missing}; registered: {', '.join(REGISTRY)}")
    for _, name, params in choices:  # benchmark options checked before anything renders
        checked = dict(params)
        region_option(name, checked)
        region_prompts_option(name, checked)
    notes = []
    if "regional" not in REGISTRY:
        notes.append("regional: not registered in this checkout when the benchmark ran, so it has no row")

    judge = load_judge(assets_root() / "judges" / "concept-judge")
    studio = Studio(f"tiny-{args.family}")
    work = args.work / args.family
    work.mkdir(parents=True, exist_ok=True)
    runs = [(BASE_LABEL, None, {}, BASE_SCENES)] + [(label, name, params, SCENES) for label, name, params in choices]
    records_by_label = {}
    for label, name, params, scenes in runs:
        records, failed = [], False
        for si, scene in enumerate(scenes):
            if failed:
                break
            options = dict(params)
            loras = stack(scene, args.family, name, region_option(name, options),
                          region_prompts_option(name, options)) if name else []
            if name and (REGISTRY[name].max_loras or len(loras)) < len(loras):
                continue
            for seed in args.seeds:
                t0 = time.process_time()
                try:
                    options = {k: v for k, v in params.items() if k not in ("region", "prompts")}
                    prompt = global_prompt(scene, options, args.family)
                    result = studio.compose(prompt, loras, name or "merge", strategy_params=options or None, seed=seed)
                except Exception as error:  # one strategy failing must not lose the others' rows
                    print(f"{label}: scene {si} seed {seed} failed: {type(error).__name__}: {error}")
                    notes.append(f"{label}: failed on scene {si}: {type(error).__name__}: {error}")
                    failed = True
                    break
                seconds = time.process_time() - t0
                file = work / f"{label.replace(' ', '_').replace('=', '-')}-s{si}-seed{seed}.png"
                result.image.save(file)
                verdict = judge_regions(judge, [result.image], HALVES)[0]
                records.append({"scene": {"left": scene.left, "right": scene.right, "left_color": scene.left_color,
                                          "right_color": scene.right_color, "extra": scene.extra,
                                          "background": scene.background},
                                "seed": seed, "file": file.name, "seconds": seconds,
                                "regions": {k: {"values": v.values, "placement": v.placement} for k, v in verdict.items()}})
        if not records:
            continue
        records_by_label[label] = records
        print(f"{label}: {score(records)}", flush=True)
    if args.add and stem.with_suffix(".json").exists():
        earlier = json.loads(stem.with_suffix(".json").read_text())
        if earlier["seeds"] != args.seeds:
            raise SystemExit(f"--add needs the earlier run's seeds {earlier['seeds']}, got {args.seeds}")
        rerun = set(records_by_label)
        records_by_label = {**earlier["images"], **records_by_label}
        notes = [n for n in earlier.get("notes", []) if n.split(":")[0] not in rerun] + notes
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "CPU")
    header = (f"tiny-{args.family}, {len(SCENES)} two-subject scenes (+{len(BASE_SCENES)} base-shape scenes without "
              f"LoRAs) x seeds {args.seeds}, {device}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores")
    payload = {"family": args.family, "seeds": args.seeds, "device": device, "threads": torch.get_num_threads(),
               "header": header, "scenes": [s.prompt(args.family) for s in SCENES],
               "base_scenes": [s.prompt(args.family) for s in BASE_SCENES], "notes": notes, "images": records_by_label}
    write_results(stem, work, payload)


def write_results(stem: Path, work: Path, payload: dict) -> None:
    """Score every strategy's records, print the table, write ``stem``.json / .md / .png."""
    rows = [{"strategy": label, **score(records)} for label, records in payload["images"].items()]
    merge = next((r["seconds_per_image"] for r in rows if r["strategy"] == "merge"), None)
    for r in rows:
        r["time_vs_merge"] = r["seconds_per_image"] / merge if merge and r["strategy"] != BASE_LABEL else None
    base_rows = [r for r in rows if r["strategy"] == BASE_LABEL]
    rows = base_rows + sorted((r for r in rows if r["strategy"] != BASE_LABEL),
                              key=lambda r: (-(r["both_right"] or 0), -(r["subject"] or 0), r["bleed"] or 0))
    text = table(rows)
    print(payload["header"])
    print(text)
    for note in payload["notes"]:
        print("note:", note)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({**payload, "strategies": rows}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"{payload['header']}\n\n{text}\n"
                                       + "".join(f"\nnote: {n}" for n in payload["notes"]) + "\n")
    write_grid(stem.with_suffix(".json"), work, stem.with_suffix(".png"))


def rejudge(stem: Path, work: Path) -> None:
    """Judge the saved images of an earlier run again (render times kept) and rewrite its results."""
    from PIL import Image

    from pipelines.assets import assets_root
    from studio.world.judge import load_judge

    payload = json.loads(stem.with_suffix(".json").read_text())
    judge = load_judge(assets_root() / "judges" / "concept-judge")
    for records in payload["images"].values():
        verdicts = judge_regions(judge, [Image.open(work / r["file"]).convert("RGB") for r in records], HALVES)
        for record, verdict in zip(records, verdicts):
            record["regions"] = {k: {"values": v.values, "placement": v.placement} for k, v in verdict.items()}
    payload.setdefault("header", f"tiny-{payload['family']}, {len(payload['scenes'])} two-subject scenes "
                                 f"(+{len(payload['base_scenes'])} base-shape scenes without LoRAs) x seeds "
                                 f"{payload['seeds']}, {payload['device']}, {payload['threads']} torch threads, "
                                 f"{os.cpu_count()} cores")
    payload.pop("strategies", None)
    write_results(stem, work, payload)


if __name__ == "__main__":
    main()
