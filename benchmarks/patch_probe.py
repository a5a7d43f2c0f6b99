"""What each layer of a shapes-world CLIP's vision tower keeps of every object: a linear probe per layer.

    python benchmarks/patch_probe.py --demo_dir outputs/demo --output benchmarks/results/patch_probe.json

The denoiser reads CLIP's patch tokens (`image_features="patches"`), one token per 32-px grid cell, so each object of
the shapes world sits in one patch. For every hidden state of the vision tower (0: the patch embeddings, -1: the last
layer, then the last one under CLIP's post-LayerNorm, which `vision_feature_layer=-1` reads) this fits two linear
classifiers on training patches, one for the colour and one for the shape of the object in a patch (or "empty"),
and scores them on the occupied patches of the test split and of the held-out split, whose colour-shape pairs never
occur in training. A layer that scores lower on held-out pairs has mixed the two attributes or the neighbouring
objects into a patch; a denoiser reading it must undo that.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

from clip_diffusionlm.demo import load_shapes_world
from clip_diffusionlm.demo.shapes_world import COLOURS, SHAPES
from clip_diffusionlm.pipelines.captioning_utils import as_rgb_images

GRID = 3


@torch.no_grad()
def patch_states(encoder: CLIPVisionModelWithProjection, processor, split) -> torch.Tensor:
    """The grid patches' hidden states of every layer, post-LayerNormed last layer appended:
    `(len(split), num_layers + 2, GRID * GRID, hidden_size)`."""
    states = []
    for start in range(0, len(split), 256):
        images = as_rgb_images(split[start : start + 256]["image"])
        pixel_values = processor(images=images, return_tensors="pt").pixel_values
        hidden_states = encoder.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        layers = [*hidden_states, encoder.vision_model.post_layernorm(hidden_states[-1])]
        states.append(torch.stack(layers, dim=1)[:, :, 1:])  # drop [CLS]
    return torch.cat(states)


def cell_labels(split, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour and shape index of the object in each grid cell, `len(COLOURS)` / `len(SHAPES)` for an empty cell."""
    colours = torch.full((len(split), GRID * GRID), len(COLOURS))
    shapes = torch.full((len(split), GRID * GRID), len(SHAPES))
    cell_size = image_size / GRID
    for row, objects in enumerate(split["objects"]):
        for obj in json.loads(objects):
            cell = int(obj["y"] // cell_size) * GRID + int(obj["x"] // cell_size)
            colours[row, cell], shapes[row, cell] = COLOURS.index(obj["colour"]), SHAPES.index(obj["shape"])
    return colours, shapes


def patches_and_labels(split_data, layer: int, label_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's patch states as rows `(images · cells, hidden_size)` and one attribute's labels `(images · cells,)`."""
    states, *labels = split_data
    return states[:, layer].reshape(-1, states.shape[-1]), labels[label_index].reshape(-1)


def probe_accuracy(train_x, train_y, eval_sets, num_classes: int, steps: int = 300) -> list[float]:
    """A linear softmax classifier on standardised features, fitted full-batch with Adam; its accuracy on the
    occupied cells (label < num_classes - 1) of each `(features, labels)` evaluation set."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    classifier = torch.nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(classifier((train_x - mean) / std), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return [
            (classifier((x - mean) / std).argmax(-1) == y)[y < num_classes - 1].float().mean().item()
            for x, y in eval_sets
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo_dir", default="outputs/demo", help="A finished `make demo` output folder.")
    parser.add_argument("--num_train", type=int, default=3000, help="Training images the probes are fitted on.")
    parser.add_argument("--output", default="benchmarks/results/patch_probe.json", help="Where the JSON goes.")
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()  # the vision tower alone leaves the text tower "UNEXPECTED"
    torch.manual_seed(0)
    demo_dir = Path(args.demo_dir)
    encoder = CLIPVisionModelWithProjection.from_pretrained(demo_dir / "clip").eval()
    processor = AutoImageProcessor.from_pretrained(demo_dir / "clip")
    world = load_shapes_world(demo_dir / "shapes")
    splits = {"train": world["train"].select(range(min(args.num_train, len(world["train"])))),
              "test": world["test"], "holdout": world["holdout"]}
    image_size = encoder.config.image_size
    data = {name: (patch_states(encoder, processor, split), *cell_labels(split, image_size))
            for name, split in splits.items()}

    num_layers = data["train"][0].shape[1]
    names = [str(layer) for layer in range(num_layers - 1)] + ["last, post-LayerNorm"]
    rows = []
    for layer, name in enumerate(names):
        row = {"layer": name}
        for attribute, label_index, num_classes in (("colour", 0, len(COLOURS) + 1), ("shape", 1, len(SHAPES) + 1)):
            per_patch = {split: patches_and_labels(data[split], layer, label_index) for split in data}
            test, holdout = probe_accuracy(*per_patch["train"], [per_patch["test"], per_patch["holdout"]], num_classes)
            row[f"{attribute}_test"], row[f"{attribute}_holdout"] = round(test, 3), round(holdout, 3)
        rows.append(row)
        print(json.dumps(row))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"demo_dir": str(demo_dir), "num_train": args.num_train,
                                             "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
