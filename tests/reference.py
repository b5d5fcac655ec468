"""Plain-diffusers reference implementations of the strategies, written the way the papers' code does it.

diffusers' own ``load_lora_weights`` + ``set_adapters`` (PEFT layers), one denoiser pass per LoRA, prompt
embeddings computed with ``set_adapters`` per LoRA. Nothing here uses the studio's composed layers or seam.
"""

from __future__ import annotations

import inspect

import torch


def load_adapters(pipe, files, names=None):
    names = names or [f"ref{i}" for i in range(len(files))]
    for name, f in zip(names, files):
        pipe.load_lora_weights(str(f), adapter_name=name)
    return names


def prompt_embedding_kwargs(family: str, rows: dict) -> dict:
    """Pipeline call arguments that hand it one lane's precomputed text conditioning (the denoiser's own argument
    names, ``[negative; positive]`` rows for SDXL's guidance)."""
    if family == "sdxl":
        npe, pe = rows["encoder_hidden_states"].chunk(2)
        nppe, ppe = rows["text_embeds"].chunk(2)
        return dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=ppe,
                    negative_pooled_prompt_embeds=nppe)
    return dict(prompt_embeds=rows["encoder_hidden_states"], pooled_prompt_embeds=rows["pooled_projections"])


def saved_lora_vs_studio(studio, build, path, loras, strategy, params, guidance):
    """``(plain, studio)``: a fresh plain pipeline with the LoRA file at ``path`` loaded by diffusers'
    ``load_lora_weights``, and ``studio.compose`` of the stack it was written from (same prompt, seed, 2 steps, 32²)."""
    kw = dict(num_inference_steps=2, guidance_scale=guidance, height=32, width=32, output_type="np")
    pipe = build()
    pipe.load_lora_weights(str(path))
    with torch.no_grad():
        expected = pipe("a corgi", generator=torch.Generator("cpu").manual_seed(1), **kw).images[0]
    got = studio.compose("a corgi", loras, strategy, strategy_params=params, steps=2, seed=1, guidance=guidance,
                         width=32, height=32, output_type="np").latents[0]
    return expected, got


def run_lanes(pipe, family: str, lanes_for_step, *, names, weights, prompt, negative_prompt, steps, guidance, seed,
              size=64, shared_text_encoding=False, lane_context=None, pipeline_kwargs=None):
    """Run ``pipe`` where each step averages the denoiser predictions of ``lanes_for_step(step)``.

    ``lanes_for_step`` returns ``[(adapter index, reduce weight), ...]``; lane i runs with only adapter i at
    its weight, conditioned on the prompt encoded with only adapter i active (or, with
    ``shared_text_encoding``, with all adapters active: the released Composite code's behaviour).
    ``lane_context(step, index)``, if given, returns a context manager each lane's pass runs inside (e.g. hooks).
    ``pipeline_kwargs`` are added to the pipeline call (img2img / inpainting inputs); a pipeline without
    ``height``/``width`` (SDXL img2img) takes its size from the image.
    """
    embeds = []
    for name, w in zip(names, weights):
        if shared_text_encoding:
            pipe.set_adapters(list(names), list(weights))
        else:
            pipe.set_adapters([name], [w])
        with torch.no_grad():
            if family == "sdxl":
                pe, npe, ppe, nppe = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                        do_classifier_free_guidance=True,
                                                        negative_prompt=negative_prompt)
                embeds.append({"encoder_hidden_states": torch.cat([npe, pe]),
                               "text_embeds": torch.cat([nppe, ppe])})
            else:
                pe, ppe, _ = pipe.encode_prompt(prompt, prompt_2=None, device="cpu", num_images_per_prompt=1)
                embeds.append({"encoder_hidden_states": pe, "pooled_projections": ppe})
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    original = denoiser.forward
    step = {"i": 0}

    def averaged(*args, **kwargs):
        out = 0
        for index, reduce_weight in lanes_for_step(step["i"]):
            pipe.set_adapters([names[index]], [weights[index]])
            kw = dict(kwargs)
            kw["encoder_hidden_states"] = embeds[index]["encoder_hidden_states"]
            if family == "sdxl":
                kw["added_cond_kwargs"] = {**kw["added_cond_kwargs"], "text_embeds": embeds[index]["text_embeds"]}
            else:
                kw["pooled_projections"] = embeds[index]["pooled_projections"]
            if lane_context is None:
                out = out + reduce_weight * original(*args, **kw)[0]
            else:
                with lane_context(step["i"], index):
                    out = out + reduce_weight * original(*args, **kw)[0]
        return (out,)

    def on_step_end(p, i, t, kw):
        step["i"] = i + 1
        return {}

    denoiser.forward = averaged
    try:
        first = embeds[0]
        call = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                    callback_on_step_end=on_step_end)
        call |= pipeline_kwargs or {}
        if "height" not in inspect.signature(type(pipe).__call__).parameters:
            call.pop("height"), call.pop("width")
        call |= prompt_embedding_kwargs(family, first)
        with torch.no_grad():
            return pipe(**call).images[0]
    finally:
        denoiser.forward = original
