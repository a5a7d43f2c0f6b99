"""Evaluate a caption pipeline on a dataset split: predictions.jsonl, metrics.json and a markdown table.

    python examples/evaluate.py --model outputs/demo/pipeline --datasets outputs/demo/shapes \
        --output_dir outputs/eval --num_inference_steps 1 2 5 10 --guidance_scale 1 2
"""

import sys

import clip_diffusionlm.demo  # noqa: F401  (a shapes world's splits are scored for content accuracy too)
from clip_diffusionlm.cli_errors import run_cli
from clip_diffusionlm.evaluation import evaluate_main

if __name__ == "__main__":
    sys.exit(run_cli(evaluate_main))
