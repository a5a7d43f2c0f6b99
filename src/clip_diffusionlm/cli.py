"""`clip-diffusionlm` command line: caption images, train, evaluate, and run the offline demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import PIL.Image
import torch

from .cli_errors import run_cli
from .pipelines.pipeline_clip_diffusion_caption import (
    RECOMMENDED_INFERENCE_STEPS,
    RECOMMENDED_LENGTH_BONUS,
    RECOMMENDED_NO_REPEAT_NGRAM_SIZE,
)


def _load_pipeline(model: str, allow_pickle: bool = False):
    from .pipelines.pipeline_clip_diffusion_caption import CLIPDiffusionCaptionPipeline

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
    from .evaluation import best_device

    pipe = _load_pipeline(args.model, allow_pickle=args.allow_pickle).to(args.device or best_device())
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    captions = pipe(
        images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_captions_per_image=args.num_captions,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        length_bonus=args.length_bonus,
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
    from . import demo  # noqa: F401  (a shapes world's splits are scored for content accuracy too)
    from .training import train, training_config_from_args

    train(training_config_from_args(argv))
    return 0


def evaluate_command(argv: list[str]) -> int:
    from . import demo  # noqa: F401  (a shapes world's splits are scored for content accuracy too)
    from .evaluation import evaluate_main

    return evaluate_main(argv)


# Commands whose flags belong to another parser (shared with examples/train.py and examples/evaluate.py).
FORWARDED_COMMANDS = {"train": train_command, "evaluate": evaluate_command}


def demo_command(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(args.output_dir, DemoConfig(seed=args.seed), verbose=args.verbose)
    return 0


def push_command(args: argparse.Namespace) -> int:
    from .hub import push_folder_to_hub

    commit = push_folder_to_hub(
        args.folder, args.repo_id, token=args.token, private=args.private, revision=args.revision,
        commit_message=args.commit_message, create_pr=args.create_pr,
    )
    print(commit.pr_url or commit.commit_url)
    return 0


def card_command(args: argparse.Namespace) -> int:
    from .hub import save_model_card, write_examples

    if args.example_images:
        pipe = _load_pipeline(args.folder)
        pipe.set_progress_bar_config(disable=True)
        write_examples(args.folder, pipe, args.example_images, args.steps)
    card = save_model_card(args.folder, args.repo_id)
    if args.output:
        card.save(args.output)
    print(f"Model card written to {args.output or args.folder + '/README.md'}.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-diffusionlm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    caption = commands.add_parser("caption", help="Caption image files with a saved pipeline.")
    caption.add_argument("images", nargs="+", help="Image files.")
    caption.add_argument("--model", required=True, help="Pipeline directory or Hub repository id.")
    caption.add_argument("--steps", type=int, default=RECOMMENDED_INFERENCE_STEPS,
                         help=f"num_inference_steps (default {RECOMMENDED_INFERENCE_STEPS}, the recommended setting).")
    caption.add_argument("--guidance-scale", type=float, default=1.0, help="Classifier-free guidance w (default 1).")
    caption.add_argument("--num-captions", type=int, default=1, help="Captions per image (default 1).")
    caption.add_argument("--no-repeat-ngram-size", type=int, default=RECOMMENDED_NO_REPEAT_NGRAM_SIZE,
                         help=f"No n-gram of this many words twice in a caption (default "
                              f"{RECOMMENDED_NO_REPEAT_NGRAM_SIZE}, the recommended setting; 0: off).")
    caption.add_argument("--length-bonus", type=float, default=RECOMMENDED_LENGTH_BONUS,
                         help=f"Added to every word's rounding score, so captions end later (default "
                              f"{RECOMMENDED_LENGTH_BONUS:g}, the recommended setting; 0: off).")
    caption.add_argument("--seed", type=int, default=0, help="Seed of the sampling noise (default 0).")
    caption.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available).")
    caption.add_argument("--json", action="store_true", help="One JSON object per image instead of TSV lines.")
    caption.add_argument("--allow-pickle", action="store_true", help="Also load .bin (pickle) weights.")
    caption.set_defaults(handler=caption_command)

    commands.add_parser("train", help="Train; the flags of examples/train.py (`train --help`).")
    commands.add_parser("evaluate", help="Evaluate; the flags of examples/evaluate.py (`evaluate --help`).")

    push = commands.add_parser(
        "push", help="Upload a saved pipeline folder (safetensors, configs, card, handler) to a Hub repository."
    )
    push.add_argument("folder", help="A folder written by save_pretrained or training.")
    push.add_argument("repo_id", help="'user/name' (created when missing).")
    push.add_argument("--token", help="Hub token with write access (default: the saved login or HF_TOKEN).")
    push.add_argument("--private", action="store_true", default=None, help="Create the repository as private.")
    push.add_argument("--revision", help="Branch to commit to (created when missing; default main).")
    push.add_argument("--commit-message", help="Commit message.")
    push.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
    push.set_defaults(handler=push_command)

    card = commands.add_parser("card", help="Regenerate the model card (README.md) of a saved pipeline folder.")
    card.add_argument("folder", help="A folder written by save_pretrained or training.")
    card.add_argument("--repo-id", help="The repository the card is for (default: the one in the current card).")
    card.add_argument("--example-images", nargs="+", help="Caption these images for the card's examples and widget.")
    card.add_argument("--steps", type=int, default=RECOMMENDED_INFERENCE_STEPS,
                      help=f"num_inference_steps of the examples (default {RECOMMENDED_INFERENCE_STEPS}).")
    card.add_argument("--output", help="Also write the card to this file (e.g. model_cards/NAME.md).")
    card.set_defaults(handler=card_command)

    demo = commands.add_parser("demo", help="The offline end-to-end demo on the shapes world.")
    demo.add_argument("--output-dir", default="outputs/demo", help="Where every stage writes (default outputs/demo).")
    demo.add_argument("--seed", type=int, default=0, help="Seed of the world, CLIP and denoiser (default 0).")
    demo.add_argument("--verbose", action="store_true", help="Show the libraries' logs and progress bars too.")
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
