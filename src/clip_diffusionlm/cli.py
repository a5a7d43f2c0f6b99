"""`clip-diffusionlm` command line: caption images, train, evaluate, and run the offline demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import PIL.Image
import torch

from .cli_errors import run_cli


def _load_pipeline(model: str, allow_pickle: bool = False):
    from .pipeline_clip_diffusion_caption import CLIPDiffusionCaptionPipeline

    return CLIPDiffusionCaptionPipeline.from_pretrained(model, allow_pickle=allow_pickle)


def caption_command(args: argparse.Namespace) -> int:
    images = []
    for path in args.images:
        try:
            with PIL.Image.open(path) as image:
                image.load()
                images.append(image.copy())
        except (OSError, ValueError) as error:
            print(f"error: cannot read image {path!r}: {error}", file=sys.stderr)
            return 2
    pipe = _load_pipeline(args.model, allow_pickle=args.allow_pickle)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    captions = pipe(
        images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_captions_per_image=args.num_captions,
        generator=generator,
    ).captions
    for index, path in enumerate(args.images):
        own = captions[index * args.num_captions : (index + 1) * args.num_captions]
        if args.json:
            print(json.dumps({"image": path, "captions": own}))
        else:
            for caption in own:
                print(f"{path}\t{caption}")
    return 0


def train_command(argv: list[str]) -> int:
    from .training import train, training_config_from_args

    train(training_config_from_args(argv))
    return 0


def evaluate_command(argv: list[str]) -> int:
    from .evaluation import evaluate_main

    return evaluate_main(argv)


# Commands whose flags belong to another parser (shared with examples/train.py and examples/evaluate.py).
FORWARDED_COMMANDS = {"train": train_command, "evaluate": evaluate_command}


def demo_command(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output_dir)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-diffusionlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="Caption image files with a saved pipeline.")
    caption.add_argument("images", nargs="+", help="Image files.")
    caption.add_argument("--model", required=True, help="Pipeline directory or Hub repository id.")
    caption.add_argument("--steps", type=int, default=5, help="num_inference_steps (default 5).")
    caption.add_argument("--guidance-scale", type=float, default=1.0, help="Classifier-free guidance w (default 1).")
    caption.add_argument("--num-captions", type=int, default=1, help="Captions per image (default 1).")
    caption.add_argument("--seed", type=int, default=0)
    caption.add_argument("--json", action="store_true", help="One JSON object per image instead of TSV lines.")
    caption.add_argument("--allow-pickle", action="store_true", help="Also load .bin (pickle) weights.")
    caption.set_defaults(handler=caption_command)

    commands.add_parser("train", help="Train; the flags of examples/train.py (`train --help`).")
    commands.add_parser("evaluate", help="Evaluate; the flags of examples/evaluate.py (`evaluate --help`).")

    demo = commands.add_parser("demo", help="The offline end-to-end demo on the shapes world.")
    demo.add_argument("--output-dir", default="outputs/demo")
    demo.set_defaults(handler=demo_command)
    return parser


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in FORWARDED_COMMANDS:
        return FORWARDED_COMMANDS[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
