"""Train CLIP-DiffusionLM: `accelerate launch examples/train.py --config examples/configs/paper_final.json ...`.

Every field of `clip_diffusionlm.training.TrainingConfig` is a flag; `--config` reads them from a JSON file first.
"""

from clip_diffusionlm.training import train, training_config_from_args

if __name__ == "__main__":
    train(training_config_from_args())
