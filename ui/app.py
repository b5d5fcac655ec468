"""The Gradio web app: layout and wiring only (what the controls do is in :mod:`ui.callbacks`).

    studio ui --lora-dir ~/loras --model stabilityai/stable-diffusion-xl-base-1.0

Left: the LoRA library (cards with preview, base model, format, rank, trigger words; search, base-model filter,
upload). Right: prompt, the stack editor (weight, step window, block-weight preset or custom values,
enable, reorder, remove), the strategy with controls generated from its declared parameters, the settings, and
three tabs: Generate (live preview, gallery of PNGs with their recipes, downloads), Compare (one recipe under
several strategies, side by side, with CLIPScores and timings) and Restore (drop a PNG to get its recipe back).

Safety: the app binds to 127.0.0.1 unless told otherwise; LoRAs are addressed by library id only; uploads
must be ``.safetensors`` under a size limit and are validated before they enter the library's upload folder;
GPU jobs run one at a time (Gradio queue, one concurrency group, plus a lock).
"""

from __future__ import annotations

import functools
from pathlib import Path

import gradio as gr

from studio import Studio
from studio.library import Library

from . import regions, strategy_form
from .callbacks import ALL_BASES, FITS, Callbacks, Scorer
from .controlnets import NONE as NO_CONTROLNET
from .controlnets import find_control_loras, find_controlnets
from .handlers import Handlers, card_markdown, md_escape, user_errors
from .model_switch import model_choices, switch_model
from .recipe_api import render_recipe_endpoint

CSS = """
/* one column that scrolls: a max height on Gradio's wrapping flex column moved the cards into a hidden second
   column at common window sizes (1280x800, 1600x1100) */
#library-panel { flex-wrap: nowrap !important; max-height: calc(100vh - 16px); overflow-y: auto;
                 position: sticky; top: 8px; align-self: flex-start; }
#library-panel > * { flex-shrink: 0; }
.lora-card { padding: 6px !important; margin-bottom: 6px; }
.lora-card .lora-thumb { flex-grow: 0 !important; }
.stack-row { padding: 6px !important; margin-bottom: 6px; }
.stack-row .stack-buttons button { min-width: 2.2em; }
#live-preview img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
/* one short caption line under each thumbnail (wrapped captions covered half of the image) */
#compare-gallery .caption-label, #gallery .caption-label { white-space: nowrap; overflow: hidden;
    text-overflow: ellipsis; max-width: 100%; font-size: 11px; padding: 1px 4px; }
"""

GPU = dict(concurrency_id="gpu", concurrency_limit=1)
STOPPED = "Stopped: the image in progress was not finished (finished ones are saved in the output folder)."
LIGHT = dict(concurrency_limit=None, show_progress="hidden")
# events that edit the stack (and the region preview that reads it) run one at a time, in the order they came: each
# reads the session's stack when it runs, so a quick series (brush strokes, a field losing focus) never overwrites a
# newer stack with an older one
STACK = dict(concurrency_id="stack", concurrency_limit=1, show_progress="hidden")


def _default_strategy() -> str:
    return strategy_form.strategy_names()[0]


def build_app(callbacks: Callbacks) -> gr.Blocks:
    """The Blocks app for ``callbacks`` (one loaded studio and library, shared by every browser session)."""
    cb, h = callbacks, Handlers(callbacks)
    defaults = cb.default_settings()
    strategies = strategy_form.strategy_names()
    with gr.Blocks(title="LoRA Composition Studio", analytics_enabled=False) as demo:
        stack = gr.State([])
        stack_rev = gr.State(0)
        params = gr.State({})
        params_rev = gr.State(0)
        library_rev = gr.State(0)
        gallery_items = gr.State([])
        compare_items = gr.State([])
        image_size = gr.State((defaults.width, defaults.height))  # the drawing canvases' aspect ratio

        gr.Markdown("## LoRA Composition Studio")
        with gr.Row(equal_height=True):
            summary_md = gr.Markdown(cb.model_summary(), elem_id="model-summary")
            offered = getattr(cb, "model_choices", [cb.studio.model])
            model_pick = gr.Dropdown(offered, value=cb.studio.model, label="Model", scale=0, min_width=220,
                                     interactive=len(offered) > 1, elem_id="model-switch")
        with gr.Row(equal_height=False):
            # ---------------------------------------------------------------------------------- library
            with gr.Column(scale=2, min_width=300, elem_id="library-panel"):
                gr.Markdown("### Library")
                query = gr.Textbox(placeholder="Search name, trigger word, base, format", show_label=False,
                                   elem_id="library-search")
                base_filter = gr.Dropdown(cb.base_filters(), value=FITS, label="Base model", elem_id="library-filter")
                refresh = gr.Button("Refresh library", size="sm", elem_id="library-refresh")
                library_status = gr.Markdown(elem_id="library-status")
                lora_name = gr.Textbox(visible=False, elem_id="lora-name")

                @gr.render(inputs=[query, base_filter, library_rev])
                def library_cards(text, base, _rev):
                    entries, total = cb.library_view(text, base)
                    if not entries:
                        gr.Markdown("No LoRA matches." + (" Try *all bases*." if base != ALL_BASES else ""))
                    for entry in entries:
                        with gr.Column(elem_classes=["lora-card"], variant="panel"):
                            with gr.Row(equal_height=False):
                                thumb = cb.thumbnail(entry)
                                if thumb is not None:
                                    gr.Image(thumb, show_label=False, container=False, interactive=False,
                                             height=88, width=88, scale=0, min_width=88, buttons=[],
                                             elem_classes=["lora-thumb"])
                                gr.Markdown(card_markdown(entry), elem_classes=["lora-card-text"])
                            with gr.Row():
                                add = gr.Button("Add to stack", size="sm", variant="primary", elem_classes=["lora-add"])
                                trig = gr.Button("Insert triggers", size="sm", elem_classes=["lora-triggers"],
                                                 interactive=bool(entry.info.triggers))
                        add.click(functools.partial(h.add, entry.id), [stack, stack_rev],
                                  [stack, stack_rev, stack_status], **STACK)
                        trig.click(functools.partial(h.insert_triggers, entry.id), [prompt], [prompt], **LIGHT)
                    if total > len(entries):
                        gr.Markdown(f"{total - len(entries)} more: refine the search.")

                upload = gr.File(label="Upload a LoRA (.safetensors)", file_types=[".safetensors"],
                                 elem_id="library-upload")

            # ---------------------------------------------------------------------------------- main
            with gr.Column(scale=4, min_width=420):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")

                gr.Markdown("### LoRA stack\n<small>weight; start and end of the LoRA's step window as fractions of "
                            "the denoising steps; block weights from the model's presets or custom</small>")
                stack_status = gr.Markdown(elem_id="stack-status")

                def region_controls(uid, entry, size):
                    """The row's region: preset / box / mask drawn on a canvas or uploaded, and a region prompt."""
                    with gr.Row():
                        kind = gr.Dropdown(regions.kind_choices(), value=entry.region_kind, label="region",
                                           interactive=True, elem_classes=["stack-region"])
                        box = gr.Textbox(entry.region_box, label="box x0,y0,x1,y1", placeholder="0,0,0.5,1",
                                         visible=entry.region_kind == regions.BOX, interactive=True,
                                         elem_classes=["stack-region-box"])
                        text = gr.Textbox(entry.region_prompt, label="region prompt", interactive=True,
                                          placeholder="what this LoRA's region shows", elem_classes=["stack-region-prompt"])
                    canvas_size = regions.canvas_size(*size)
                    # hidden until the region is a mask (Gradio mounts no hidden component: rows without a mask
                    # region cost no canvas in the browser)
                    with gr.Column(visible=entry.region_kind == regions.MASK, elem_classes=["stack-mask"]) as mask_area:
                        canvas = gr.ImageEditor(
                            regions.editor_value(entry.region_mask, canvas_size), sources=(), type="numpy",
                            image_mode="RGBA", format="png", layers=False, transforms=(), height=240,
                            label="region mask: paint where the LoRA acts",
                            brush=gr.Brush(colors=["#ff0000"], default_color="#ff0000", color_mode="fixed",
                                           default_size=max(4, canvas_size[0] // 10)),
                            interactive=True, elem_classes=["stack-canvas"])
                        upload_mask = gr.UploadButton("Upload a mask image (white = inside)", file_types=["image"],
                                                      size="sm", elem_classes=["stack-mask-upload"])
                    kind.change(functools.partial(h.set_region_kind, uid), [stack, kind, strategy],
                                [stack, box, mask_area, strategy, stack_status], **STACK)
                    for event, name, field in ((box.blur, "region_box", box), (box.submit, "region_box", box),
                                               (text.blur, "region_prompt", text)):
                        event(functools.partial(h.set_region_text, uid, name), [stack, field, strategy],
                              [stack, strategy, stack_status], **STACK)
                    # strokes faster than the canvas uploads: only the newest drawing is sent
                    for canvas_event in (canvas.input, canvas.clear):  # clearing the canvas detaches the mask
                        canvas_event(functools.partial(h.set_region_mask, uid), [stack, canvas, strategy],
                                     [stack, strategy, stack_status], trigger_mode="always_last", **STACK)
                    upload_mask.upload(functools.partial(h.upload_region_mask, uid),
                                       [stack, upload_mask, image_size, strategy],
                                       [stack, canvas, strategy, stack_status], **STACK)

                @gr.render(inputs=[stack, image_size], triggers=[stack_rev.change, demo.load])
                def stack_rows(entries, size):
                    if not entries:
                        gr.Markdown("Empty: add LoRAs from the library. Order matters for switch-like strategies.",
                                    elem_id="stack-empty")
                    presets = cb.block_presets()
                    for i, entry in enumerate(entries):
                        uid = entry.uid
                        with gr.Column(elem_classes=["stack-row"], variant="panel"):
                            with gr.Row(equal_height=True):
                                gr.Markdown(f"**{i + 1}. {md_escape(entry.label)}**  \n<small>{md_escape(entry.lora_id)}</small>",
                                            elem_classes=["stack-name"])
                                enabled = gr.Checkbox(entry.enabled, label="on", scale=0, min_width=60, interactive=True,
                                                      elem_classes=["stack-enabled"])
                                with gr.Row(elem_classes=["stack-buttons"]):
                                    up = gr.Button("Up", size="sm", min_width=40, elem_classes=["stack-up"])
                                    down = gr.Button("Down", size="sm", min_width=40, elem_classes=["stack-down"])
                                    drop = gr.Button("Remove", size="sm", min_width=40, variant="stop",
                                                     elem_classes=["stack-remove"])
                            with gr.Row():
                                weight = gr.Slider(-2, 2, value=entry.weight, step=0.05, label="weight",
                                                   interactive=True, elem_classes=["stack-weight"])
                                start = gr.Slider(0, 1, value=entry.start, step=0.05, label="start",
                                                  interactive=True, elem_classes=["stack-start"])
                                end = gr.Slider(0, 1, value=entry.end, step=0.05, label="end",
                                                interactive=True, elem_classes=["stack-end"])
                            with gr.Row():
                                preset = gr.Dropdown(presets, value=entry.preset, label="block weights",
                                                     interactive=True, elem_classes=["stack-preset"])
                                custom = gr.Textbox(entry.custom_blocks, label="custom block weights",
                                                    placeholder="down=0,mid=1,up.0=0.5",
                                                    info="blocks: " + ", ".join(cb.block_names()),
                                                    visible=entry.preset == "custom", interactive=True,
                                                    elem_classes=["stack-custom"])
                            region_controls(uid, entry, size)
                        for component, name in ((weight, "weight"), (start, "start"), (end, "end"),
                                                (enabled, "enabled"), (custom, "custom_blocks")):
                            event = component.blur if component is custom else component.change
                            event(functools.partial(h.set_field, uid, name), [stack, component], [stack], **STACK)
                        preset.change(functools.partial(h.set_preset, uid), [stack, preset], [stack, custom], **STACK)
                        up.click(functools.partial(h.move, uid, -1), [stack, stack_rev], [stack, stack_rev], **STACK)
                        down.click(functools.partial(h.move, uid, 1), [stack, stack_rev], [stack, stack_rev], **STACK)
                        drop.click(functools.partial(h.remove, uid), [stack, stack_rev], [stack, stack_rev], **STACK)

                clear = gr.Button("Clear stack", size="sm", elem_id="stack-clear")
                region_view = gr.Image(label="Regions before rendering: what each LoRA covers, on the model's grid",
                                       visible=False, interactive=False, height=220, format="png", buttons=[],
                                       elem_id="region-preview")
                region_legend = gr.Markdown(elem_id="region-legend")

                gr.Markdown("### Strategy")
                strategy = gr.Dropdown(strategies, value=_default_strategy(), label="Strategy", elem_id="strategy")
                strategy_info = gr.Markdown(strategy_form.strategy_label(_default_strategy()), elem_id="strategy-info")

                @gr.render(inputs=[strategy, params], triggers=[strategy.change, params_rev.change, demo.load])
                def strategy_params(name, store):
                    declared = strategy_form.params_of(name)
                    if not declared:
                        gr.Markdown(f"*{md_escape(name)} has no parameters.*", elem_id="strategy-no-params")
                        return
                    values = strategy_form.values_for(name, store)
                    with gr.Row():
                        for param in declared:
                            control = strategy_form.control(param, values[param.name])
                            control.change(functools.partial(h.set_param, name, param.name), [params, control],
                                           [params], **LIGHT)

                gr.Markdown("### Settings")
                with gr.Row():
                    seed = gr.Number(defaults.seed, label="seed (-1: random)", precision=0, elem_id="seed", min_width=120)
                    dice = gr.Button("Random seed", size="sm", scale=0, min_width=90, elem_id="seed-random")
                    count = gr.Slider(1, 16, value=1, step=1, label="batch count", elem_id="count")
                with gr.Row():
                    steps = gr.Slider(1, 150, value=defaults.steps, step=1, label="steps", elem_id="steps")
                    guidance = gr.Slider(0, 20, value=defaults.guidance, step=0.5, label="guidance", elem_id="guidance")
                with gr.Row():
                    width = gr.Slider(16, 2048, value=defaults.width, step=16, label="width", elem_id="width")
                    height = gr.Slider(16, 2048, value=defaults.height, step=16, label="height", elem_id="height")
                with gr.Accordion("Input image: img2img, inpainting, ControlNet (optional)", open=False,
                                  elem_id="input-panel"):
                    with gr.Row():
                        init_image = gr.Image(label="image (resized to width x height)", type="pil",
                                              image_mode="RGB", sources=["upload", "clipboard"], height=160,
                                              elem_id="init-image")
                        init_mask = gr.Image(label="mask: white = repaint (inpainting)", type="pil", image_mode="L",
                                             sources=["upload", "clipboard"], height=160, elem_id="init-mask")
                    strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, elem_id="strength",
                                         label="strength: the part of the steps that runs (1: all)")
                    # ControlNet: a control image and one of the ControlNets the app was started with (ui.controlnets)
                    with gr.Row():
                        control_image = gr.Image(label="control image (edges, depth, pose ...)", type="pil",
                                                 image_mode="RGB", sources=["upload", "clipboard"], height=160,
                                                 elem_id="control-image")
                        with gr.Column():
                            controls = [*cb.controlnets, *cb.control_loras]
                            controlnet = gr.Dropdown(
                                [NO_CONTROLNET, *controls], value=next(iter(controls), NO_CONTROLNET),
                                label="ControlNet or FLUX control LoRA" + (
                                    "" if controls else " (start the app with --controlnet DIR / --control-lora FILE)"),
                                elem_id="controlnet")
                            controlnet_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, elem_id="controlnet-scale",
                                                         label="ControlNet conditioning scale / control LoRA weight")

            # ---------------------------------------------------------------------------------- outputs
            with gr.Column(scale=4, min_width=420):
                with gr.Tabs():
                    with gr.Tab("Generate", id="tab-generate"):
                        with gr.Row():
                            generate = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        progress_text = gr.Markdown(elem_id="progress")
                        with gr.Row(equal_height=False):
                            live = gr.Image(label="Live preview", interactive=False, height=300, elem_id="live-preview",
                                            format="png", buttons=[], min_width=160)
                            gallery = gr.Gallery(label="Images (click one for its recipe)", columns=2, height=300,
                                                 elem_id="gallery", format="png", buttons=["download", "fullscreen"],
                                                 min_width=200)
                        with gr.Row(equal_height=False):
                            masks_view = gr.Image(label="Region masks the selected image used", visible=False,
                                                  interactive=False, height=220, format="png", buttons=[],
                                                  elem_id="region-masks")
                            masks_legend = gr.Markdown(elem_id="region-masks-legend")
                        recipe = gr.Code(label="Recipe of the selected image (TOML)", language=None, lines=8,
                                         max_lines=16, interactive=False, elem_id="recipe")
                        with gr.Row():
                            png_download = gr.DownloadButton("Download PNG (recipe embedded)", interactive=False,
                                                             elem_id="download-png")
                            toml_download = gr.DownloadButton("Download recipe TOML", interactive=False,
                                                              elem_id="download-toml")
                    with gr.Tab("Compare", id="tab-compare"):
                        with gr.Row(equal_height=False):
                            compare_strategies = gr.CheckboxGroup(strategies, value=strategies[:2],
                                                                  label="Strategies", elem_id="compare-strategies")
                            include_base = gr.Checkbox(True, label="also without LoRAs", elem_id="compare-base")
                        compare = gr.Button("Compare", variant="primary", elem_id="compare")
                        compare_text = gr.Markdown(elem_id="compare-progress")
                        compare_gallery = gr.Gallery(label="Side by side", columns=4, height="auto", format="png",
                                                     elem_id="compare-gallery", buttons=["download", "fullscreen"])
                        scores = gr.Dataframe(headers=["run", "CLIPScore", "render s"], interactive=False,
                                              elem_id="compare-table", type="array")
                        with gr.Row(equal_height=False):
                            compare_masks = gr.Image(label="Region masks the selected image used", visible=False,
                                                     interactive=False, height=220, format="png", buttons=[],
                                                     elem_id="compare-region-masks")
                            compare_masks_legend = gr.Markdown(elem_id="compare-region-masks-legend")
                        compare_recipe = gr.Code(label="Recipe of the selected image (TOML)", language=None, lines=8,
                                                 max_lines=16, interactive=False, elem_id="compare-recipe")
                        with gr.Row():
                            compare_png = gr.DownloadButton("Download PNG", interactive=False, elem_id="compare-png")
                            compare_toml = gr.DownloadButton("Download recipe TOML", interactive=False,
                                                             elem_id="compare-toml")
                    with gr.Tab("Restore", id="tab-restore"):
                        restore_file = gr.File(label="Drop a PNG made by the studio (or by A1111)", file_types=[".png"],
                                               elem_id="restore-file")
                        restore_status = gr.Markdown(elem_id="restore-status")

        # ---------------------------------------------------------------------------------- wiring
        lora_name.submit(h.add, [lora_name, stack, stack_rev], [stack, stack_rev, stack_status], api_name="add_lora",
                         **STACK)
        refresh.click(h.refresh, [library_rev], [library_rev, library_status, base_filter], **LIGHT)
        upload.upload(h.upload, [upload, library_rev], [library_rev, library_status, upload], **GPU)
        clear.click(cb.clear, [stack_rev], [stack, stack_rev], **STACK)
        strategy.change(strategy_form.strategy_label, [strategy], [strategy_info], **LIGHT)
        dice.click(cb.random_seed, None, [seed], **LIGHT)

        settings_inputs = [prompt, negative, seed, steps, guidance, width, height]
        # a new job starts from an empty gallery and preview, so the images shown are always this job's (chained, so
        # the clearing cannot land after the job's images)
        # (the clearing step queues behind pending stack edits, so the job reads the stack as the user left it)
        job = generate.click(lambda: ([], [], None), None, [gallery, gallery_items, live], api_visibility="private",
                             **STACK).then(
            h.generate, [*settings_inputs, count, strategy, params, stack, init_image, init_mask, strength,
                         control_image, controlnet, controlnet_scale],
            [live, progress_text, gallery, gallery_items, recipe, png_download, toml_download, seed],
            api_name="generate", show_progress="minimal", **GPU)
        gallery.select(h.select, [gallery_items], [recipe, png_download, toml_download], **LIGHT)
        # regions: the overlay before rendering follows every edit; after a job, the masks its first image used
        # (and those of the image the user picks)
        preview_inputs = [stack, width, height, strategy, params]
        for change in (stack.change, width.change, height.change, strategy.change, params.change):
            change(h.region_preview, preview_inputs, [region_view, region_legend], api_visibility="private", **STACK)
        for size_change in (width.change, height.change):
            size_change(lambda w, h_: (w, h_), [width, height], [image_size], api_visibility="private", **LIGHT)
        generate.click(lambda: (gr.update(value=None, visible=False), ""), None, [masks_view, masks_legend],
                       api_visibility="private", **LIGHT)
        job.then(h.masks_of, [gallery_items], [masks_view, masks_legend], api_visibility="private", **LIGHT)
        gallery.select(h.select_masks, [gallery_items], [masks_view, masks_legend], **LIGHT)
        comparison = compare.click(
            h.compare, [compare_strategies, include_base, *settings_inputs, params, stack],
            [compare_gallery, compare_items, scores, compare_text, compare_recipe, compare_png, compare_toml],
            api_name="compare", show_progress="minimal", **GPU)
        compare_gallery.select(h.select, [compare_items], [compare_recipe, compare_png, compare_toml], **LIGHT)
        compare_gallery.select(h.select_masks, [compare_items], [compare_masks, compare_masks_legend], **LIGHT)
        # Stop leaves no stale step count or preview: the message follows the cancellation (chained), so no late
        # progress update of the cancelled job can overwrite it
        stop.click(None, None, None, cancels=[job, comparison]).then(
            lambda: (STOPPED, STOPPED, None), None, [progress_text, compare_text, live], api_visibility="private",
            **LIGHT)
        def switch(name, lib_rev, st_rev):
            status = switch_model(cb, name, offered, getattr(cb, "studio_options", {}))
            d = cb.default_settings()
            return (cb.model_summary(), (lib_rev or 0) + 1, gr.update(choices=cb.base_filters(), value=FITS), [],
                    (st_rev or 0) + 1, d.steps, d.guidance, d.width, d.height, md_escape(status))

        model_pick.change(user_errors(switch), [model_pick, library_rev, stack_rev],
                          [summary_md, library_rev, base_filter, stack, stack_rev, steps, guidance, width, height,
                           stack_status], api_name="switch_model", **GPU)
        restore_file.upload(
            h.restore, [restore_file, params, strategy, stack_rev, params_rev],
            [prompt, negative, seed, steps, guidance, width, height, strategy, params, params_rev, stack, stack_rev,
             restore_status], api_name="restore", **LIGHT).then(lambda: "", None, [stack_status],
                                                                 api_visibility="private", **LIGHT)

        # ---------------------------------------------------------------------------------- API only
        # one endpoint that takes a whole recipe (TOML or JSON) and returns images and recipes (ui.recipe_api)
        api_recipe = gr.Textbox(visible=False, label="recipe (TOML or JSON)")
        api_count = gr.Number(1, visible=False, precision=0, label="count")
        api_images = gr.Gallery(visible=False, format="png", label="images")
        api_recipes = gr.Textbox(visible=False, label="recipes (TOML)")
        api_recipe.submit(user_errors(render_recipe_endpoint(cb)), [api_recipe, api_count], [api_images, api_recipes],
                          api_name="render_recipe", api_description="Render a whole recipe (TOML or JSON text: "
                          "prompt, strategy and parameters, LoRAs from the library with weights, step windows and "
                          "block weights, seed, steps, guidance, size); returns the PNGs and their recipes.", **GPU)
    return demo


def make_app(model: str, lora_dirs: list[str | Path], *, out_dir: str | Path = "outputs/ui",
             scorer: Scorer | None = None, device: str | None = None, dtype: str | None = None,
             offload: bool = False, config: str | None = None, max_upload_mb: float = 1024,
             preview_every: int | None = None, controlnets: list[str | Path] = (),
             control_loras: list[str | Path] = ()) -> tuple[gr.Blocks, Callbacks]:
    """Load ``model``, scan ``lora_dirs`` and build the app (not launched yet); ``controlnets``: ControlNet folders
    the input panel offers."""
    offered_controlnets = find_controlnets(controlnets)  # checked before the model loads
    offered_control_loras = find_control_loras(control_loras)
    library = Library(lora_dirs)
    studio = Studio(model, device=device, dtype=dtype, offload=offload, config=config)
    callbacks = Callbacks(studio, library, out_dir=out_dir, scorer=scorer, max_upload_bytes=int(max_upload_mb * 1e6),
                          preview_every=preview_every, controlnets=offered_controlnets,
                          control_loras=offered_control_loras)
    callbacks.model_choices = model_choices(model)  # what the Model menu offers (ui.model_switch)
    callbacks.studio_options = dict(device=device, dtype=dtype, offload=offload, config=config)
    return build_app(callbacks), callbacks


def launch(demo: gr.Blocks, callbacks: Callbacks, *, host: str = "127.0.0.1", port: int | None = None,
           block: bool = True, quiet: bool = False, max_queue: int = 64):
    """Serve ``demo``: one GPU job at a time through Gradio's queue; only the output folder is served."""
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo.launch(
        server_name=host, server_port=port, prevent_thread_lock=not block, quiet=quiet, show_error=True,
        allowed_paths=[str(callbacks.out_dir)], max_file_size=callbacks.max_upload_bytes,
        footer_links=["api", "gradio"], css=CSS, theme=gr.themes.Soft(), inbrowser=False,
    )
