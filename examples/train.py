"""Train CLIP-DiffusionLM: `accelerate launch examples/train.py --config examples/configs/paper_final.json ...`.

Every field of `clip_diffusionlm.training.TrainingConfig` is a flag; `--config` reads them from a JSON file first.
"""

import sys

import clip_diffusionlm.demo  # noqa: F401  (a shapes world's splits are scored for content accuracy too)
from clip_diffusionlm.cli_errors import run_cli
from clip_diffusionlm.training import train, training_config_from_args

if __name__ == "__main__":
    sys.exit(run_cli(lambda argv: train(training_config_from_args(argv))))
