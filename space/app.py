"""
CLIP-DiffusionLM caption demo (a Gradio app, and as it is a Hugging Face Space): upload an image or pick an example,
choose the number of denoising steps and the guidance, and watch the caption form step by step.

    python space/app.py --model user/repo        # or a saved pipeline folder; CLIP_DIFFUSIONLM_MODEL works too

It needs only `requirements.txt` (gradio, torch, transformers, diffusers): the captioner's code comes with its
repository.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path

import gradio as gr
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import snapshot_download

MODEL_ENV = "CLIP_DIFFUSIONLM_MODEL"
# The captioner this Space shows when no other is configured (also its README's `models:` entry).
DEFAULT_MODEL = "clip-diffusionlm/shapes-demo"


def caption_with_trajectory(
    pipe: DiffusionPipeline,
    image: PIL.Image.Image,
    num_inference_steps: int,
    guidance_scale: float,
    num_captions: int,
    seed: int,
) -> tuple[list[str], list[list]]:
    """The final captions and, for every denoising step, the caption its `x̂0` rounds to (of the first sample)."""
    trajectory = []

    def record_step(pipeline, step_index, timestep, callback_kwargs):
        so_far = pipeline.decode(callback_kwargs["original_estimate"][:1],
                                 image_embeds=callback_kwargs["image_embeds"][:1])[0]
        trajectory.append([step_index + 1, int(timestep), so_far])
        return {}

    captions = pipe(
        image,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        num_captions_per_image=num_captions,
        generator=torch.Generator().manual_seed(seed),
        callback_on_step_end=record_step,
        callback_on_step_end_tensor_inputs=["original_estimate", "image_embeds"],
    ).captions
    return captions, trajectory


def build_demo(pipe: DiffusionPipeline, examples: list[str], title: str) -> gr.Blocks:
    """The app: image, sliders and a button in; captions and the step-by-step table out."""
    pipe.set_progress_bar_config(disable=True)
    # The pipeline's own default is its recommended number of steps.
    recommended_steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default

    def run(image, steps, guidance, num_captions, seed):
        if image is None:
            raise gr.Error("Upload an image or pick an example first.")
        captions, trajectory = caption_with_trajectory(
            pipe, image, int(steps), float(guidance), int(num_captions), int(seed)
        )
        return "\n".join(captions), trajectory

    with gr.Blocks(title=title) as demo:
        gr.Markdown(
            f"# {title}\nA [CLIP-DiffusionLM](https://arxiv.org/abs/2210.04559) captioner writes the whole caption at "
            "once: it starts from noise in word-embedding space and denoises it in a few steps. The table shows the "
            "caption each step's estimate rounds to."
        )
        with gr.Row():
            image = gr.Image(type="pil", image_mode="RGB", label="Image", elem_id="image")
            with gr.Column():
                steps = gr.Slider(1, 50, value=recommended_steps, step=1, label="Denoising steps")
                guidance = gr.Slider(0.0, 5.0, value=1.0, step=0.1, label="Guidance scale (1 = off)")
                num_captions = gr.Slider(1, 4, value=1, step=1, label="Captions")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
        caption = gr.Textbox(label="Caption", lines=2, elem_id="caption")
        trajectory = gr.Dataframe(
            headers=["step", "timestep", "caption so far"], label="How the caption forms", elem_id="trajectory"
        )
        if examples:
            gr.Examples(examples, inputs=image)
        button.click(run, [image, steps, guidance, num_captions, seed], [caption, trajectory])
    return demo


def load(model: str) -> tuple[DiffusionPipeline, list[str]]:
    """The pipeline, run from its repository's own code, and the example images the repository holds (written with
    its model card)."""
    folder = Path(model if os.path.isdir(model) else snapshot_download(model))
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    return pipe, sorted(str(path) for path in (folder / "examples").glob("*.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV, DEFAULT_MODEL),
                        help=f"Hub id or folder (default ${MODEL_ENV}, else {DEFAULT_MODEL}).")
    # A Space sets GRADIO_SERVER_NAME=0.0.0.0; locally the app stays on this machine.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args()
    pipe, examples = load(args.model)
    build_demo(pipe, examples, f"CLIP-DiffusionLM: {args.model}").launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
