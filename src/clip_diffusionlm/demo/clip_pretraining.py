"""Contrastive pre-training of a small CLIP, for machines where no pretrained CLIP can be downloaded.

The result is a standard transformers `CLIPModel` checkpoint (with image processor and tokenizer) that
`CLIPVisionModelWithProjection.from_pretrained` loads exactly like `openai/clip-vit-base-patch32`: the recipe of
the paper at toy scale. The text tower reuses a BERT WordPiece tokenizer; CLIP's text model pools at
`eos_token_id`, which is therefore set to [SEP].
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModelWithProjection,
    get_cosine_schedule_with_warmup,
)
from transformers.image_processing_utils import BaseImageProcessor

from ..clip_features import encode_dataset_images, encode_texts
from ..pipelines.captioning_utils import to_rgb

logger = logging.getLogger("clip_diffusionlm.clip_pretraining")


@dataclass
class CLIPPretrainingConfig:
    """Size and optimisation of the toy CLIP; each field's help text (also `examples/pretrain_clip.py --help`) says
    what it does."""

    image_size: int = field(default=96, metadata={"help": "Input resolution of the vision tower."})
    patch_size: int = field(default=32, metadata={"help": (
        "ViT patch size. One patch per cell of the shapes world's 3x3 grid puts each object in a single patch, whose "
        "linear embedding then sees the whole shape: with 8-px patches at 64 px (64 tokens) the same budget left "
        "shapes barely above chance, with 9 tokens a step is also ~5x cheaper."
    )})
    hidden_size: int = field(default=128, metadata={"help": "Width of both towers."})
    num_layers: int = field(default=3, metadata={"help": "Transformer layers of each tower."})
    projection_dim: int = field(default=128, metadata={
        "help": "Size of the joint embedding (`image_embeds`), i.e. the denoiser's `condition_dim`."
    })
    max_text_length: int = field(default=32, metadata={"help": "Token positions of the text tower."})
    epochs: int = field(default=12, metadata={
        "help": "Passes over the training images (a random reference caption each time)."
    })
    captions_per_image: int | None = field(default=None, metadata={"help": (
        "Sample each image's caption from its first k references only (the shapes world's first is its canonical "
        "caption); all of them by default."
    )})
    batch_size: int = field(default=128, metadata={"help": "Image-caption pairs per contrastive batch."})
    learning_rate: float = field(default=2e-3, metadata={
        "help": "Peak AdamW learning rate, cosine-decayed after a short warm-up."
    })
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and caption sampling."})
    hard_negative_swaps: dict | None = field(default=None, metadata={"help": (
        "Word → words that contradict it (e.g. 'circle' → the other shape names). Every caption of a batch gets a "
        "twin with one such word swapped, added to the image→text candidates only, as in NegCLIP (Yuksekgonul et "
        "al., 2023): the image embedding must then tell those words apart, not just the easiest cue (colour). Set "
        "from the command line with --hard_negatives."
    )})

    def __post_init__(self):
        if self.captions_per_image is not None and (
            isinstance(self.captions_per_image, bool) or not isinstance(self.captions_per_image, int)
            or self.captions_per_image < 1
        ):
            raise ValueError(f"captions_per_image must be a positive int or None, got {self.captions_per_image!r}.")


def build_clip(config: CLIPPretrainingConfig, tokenizer) -> CLIPModel:
    """A randomly initialised `CLIPModel` of the given size whose text tower speaks `tokenizer`'s vocabulary."""
    tower = {
        "hidden_size": config.hidden_size,
        "intermediate_size": 4 * config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": max(1, config.hidden_size // 32),
        # Repeated per tower so that CLIP{Vision,Text}ModelWithProjection.from_pretrained sizes its projection right.
        "projection_dim": config.projection_dim,
    }
    clip_config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": tokenizer.vocab_size,
            "max_position_embeddings": config.max_text_length,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id,
        },
        vision_config={**tower, "image_size": config.image_size, "patch_size": config.patch_size},
        projection_dim=config.projection_dim,
    )
    torch.manual_seed(config.seed)
    return CLIPModel(clip_config)


def hard_negative(caption: str, swaps: dict[str, list[str]], generator: torch.Generator) -> str | None:
    """
    A false twin of `caption`, or `None` when no word of it is in `swaps`. If two of its words contradict each other
    they trade places ("a red circle and a blue star" → "a red star and a blue circle"), which only an embedding
    that binds attributes to objects can reject; otherwise one word is replaced by a contradicting one. Punctuation
    attached to a word stays in place. An exchange between objects that share their other attribute ("a red circle
    and a red star") says the same thing; such twins are a small fraction and are kept.
    """
    words = caption.split(" ")
    stems = [word.rstrip(",:;.") for word in words]
    candidates = [i for i, stem in enumerate(stems) if stem in swaps]
    if not candidates:
        return None

    def pick(options: list) -> Any:
        return options[torch.randint(len(options), (), generator=generator).item()]

    def put(position: int, replacement: str) -> None:
        words[position] = replacement + words[position][len(stems[position]):]

    exchanges = [(i, j) for i in candidates for j in candidates if i < j and stems[j] in swaps[stems[i]]]
    if exchanges:
        i, j = pick(exchanges)
        put(i, stems[j])
        put(j, stems[i])
    else:
        position = pick(candidates)
        put(position, pick(swaps[stems[position]]))
    return " ".join(words)


def contrastive_texts(
    references: list[list[str]], config: CLIPPretrainingConfig, generator: torch.Generator
) -> list[str]:
    """
    The text candidates of one contrastive batch: per image, one caption drawn from its first
    `config.captions_per_image` references, then the hard negatives of those captions that have one (fewer than
    the images when some caption has no swappable word).
    """
    texts = []
    for captions in references:
        captions = captions[: config.captions_per_image]
        texts.append(captions[torch.randint(len(captions), (), generator=generator).item()])
    if config.hard_negative_swaps:
        negatives = [hard_negative(text, config.hard_negative_swaps, generator) for text in texts]
        texts += [negative for negative in negatives if negative is not None]
    return texts


def contrastive_logits(
    model: CLIPModel,
    input_ids: torch.LongTensor,
    attention_mask: torch.LongTensor,
    pixel_values: torch.FloatTensor,
    num_length_groups: int = 4,
) -> torch.FloatTensor:
    """
    `model(...).logits_per_image`, shape `(num_images, num_texts)`, with the right-padded texts encoded in groups of
    similar length, each cut after its own longest text. CLIP's text tower is causal and pools at the end-of-text
    token, so padding after it changes no embedding; padding every caption to the batch's longest wasted about 40 % of
    the text tower's work in the shapes world.
    """
    image_embeds = model.get_image_features(pixel_values=pixel_values).pooler_output
    lengths = attention_mask.sum(dim=1)
    order = lengths.argsort()
    groups = []
    for group in order.chunk(num_length_groups):
        length = int(lengths[group].max())
        groups.append(model.get_text_features(
            input_ids=input_ids[group, :length], attention_mask=attention_mask[group, :length]
        ).pooler_output)
    text_embeds = torch.cat(groups)[order.argsort()]  # back in the order of `input_ids`
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * image_embeds @ text_embeds.T


def contrastive_loss(logits_per_image: torch.FloatTensor, batch_size: int) -> torch.FloatTensor:
    """
    CLIP's symmetric InfoNCE loss where the text candidates may hold extra hard negatives after the `batch_size`
    positives: `logits_per_image` has shape `(batch_size, batch_size + num_negatives)`; image→text ranks all
    candidates, text→image only the positive captions.
    """
    labels = torch.arange(batch_size, device=logits_per_image.device)
    image_to_text = torch.nn.functional.cross_entropy(logits_per_image, labels)
    text_to_image = torch.nn.functional.cross_entropy(logits_per_image[:, :batch_size].T, labels)
    return (image_to_text + text_to_image) / 2


def _pixel_values(image_processor: BaseImageProcessor, split: Dataset) -> torch.FloatTensor:
    images = [to_rgb(image) for image in split["image"]]
    return image_processor(images=images, return_tensors="pt").pixel_values


def pretrain_clip(
    train_split: Dataset,
    output_dir: str | os.PathLike,
    tokenizer_name_or_path: str,
    config: CLIPPretrainingConfig | None = None,
) -> Path:
    """
    Trains a CLIP on a caption split (the shapes world by default) and saves model, image processor and tokenizer.

    Pixel values are computed once and kept in memory (the toy images are small), so each step is just the two
    towers. Skips training when `output_dir` already holds a checkpoint trained with the same configuration.

    Args:
        train_split (`datasets.Dataset`):
            Rows with `image` and `captions`.
        output_dir (`str` or `os.PathLike`):
            Where the CLIP checkpoint is written.
        tokenizer_name_or_path (`str`):
            A BERT WordPiece tokenizer for the text tower.
        config (`CLIPPretrainingConfig`, *optional*):
            Model size and optimisation.
    """
    config = config or CLIPPretrainingConfig()
    output_dir = Path(output_dir)
    marker = output_dir / "pretraining_config.json"
    recipe = {**asdict(config), "num_images": len(train_split), "tokenizer": str(tokenizer_name_or_path)}
    if marker.is_file() and json.loads(marker.read_text()) == recipe:
        logger.info("Reusing the CLIP in %s.", output_dir)
        return output_dir

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    )
    model = build_clip(config, tokenizer)
    # A list: indexing the dataset's column row by row costs a `select` each, about a fifth of a CLIP step.
    captions = train_split["captions"][:]
    pixel_values = torch.cat([
        _pixel_values(image_processor, train_split.select(range(i, min(i + 512, len(train_split)))))
        for i in range(0, len(train_split), 512)
    ])  # (num_images, 3, image_size, image_size)

    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, len(train_split) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    # Fused: the text tower's 30k-row embedding table made the per-parameter update a tenth of a step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.1, fused=True)
    warmup = max(1, total_steps // 20)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    model.train()
    progress = tqdm(total=total_steps, desc="CLIP pre-training")
    for _ in range(config.epochs):
        order = torch.randperm(len(train_split), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            texts = contrastive_texts([captions[i] for i in batch.tolist()], config, generator)
            tokens = tokenizer(
                texts, padding=True, truncation=True, max_length=config.max_text_length, return_tensors="pt"
            )
            logits_per_image = contrastive_logits(
                model, tokens.input_ids, tokens.attention_mask, pixel_values[batch]
            )  # (batch, batch + negatives)
            loss = contrastive_loss(logits_per_image, len(batch))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()

    model.eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    marker.write_text(json.dumps(recipe, indent=2))  # last: its presence means the checkpoint is complete
    return output_dir


@torch.no_grad()
def zero_shot_retrieval(clip_dir: str | os.PathLike, split: Dataset, batch_size: int = 256) -> dict[str, float]:
    """
    Image→text retrieval among the split's first reference captions: recall@1 and @5, where retrieving a caption
    identical to one of the image's own references counts as a hit (the toy world repeats short captions).
    """
    from transformers import CLIPTextModelWithProjection

    image_encoder = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    text_encoder = CLIPTextModelWithProjection.from_pretrained(clip_dir).eval()
    image_processor = AutoImageProcessor.from_pretrained(clip_dir)
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    references = split["captions"][:]
    candidates = [captions[0] for captions in references]
    image_embeds = encode_dataset_images(image_encoder, image_processor, split, batch_size)
    text_embeds = torch.cat([
        encode_texts(text_encoder, tokenizer, candidates[i : i + batch_size])
        for i in range(0, len(candidates), batch_size)
    ])
    ranking = (image_embeds @ text_embeds.T).topk(k=min(5, len(candidates)), dim=-1).indices
    hits_at_1 = hits_at_5 = 0
    for image, ranked in enumerate(ranking.tolist()):
        own = set(references[image])
        matches = [candidates[j] in own for j in ranked]
        hits_at_1 += matches[0]
        hits_at_5 += any(matches)
    return {"recall@1": hits_at_1 / len(split), "recall@5": hits_at_5 / len(split), "num_images": len(split)}


@torch.no_grad()
def attribute_probe(
    clip_dir: str | os.PathLike, reference_split: Dataset, query_split: Dataset, batch_size: int = 256
) -> dict[str, float]:
    """
    How much of the shapes world's content CLIP's image embedding holds: for each query image, the nearest reference
    image in embedding space, and how often it has the same multiset of colours, of shapes, and of both. A denoiser
    conditioned on this embedding can hardly name objects better than this.
    """
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(clip_dir).eval()
    image_processor = AutoImageProcessor.from_pretrained(clip_dir)

    query_embeds = encode_dataset_images(image_encoder, image_processor, query_split, batch_size)
    reference_embeds = encode_dataset_images(image_encoder, image_processor, reference_split, batch_size)
    nearest = (query_embeds @ reference_embeds.T).argmax(-1)
    references = [json.loads(objects) for objects in reference_split["objects"]]
    queries = [json.loads(objects) for objects in query_split["objects"]]
    result = {}
    for name, keys in (("colours", ("colour",)), ("shapes", ("shape",)), ("objects", ("colour", "shape"))):
        def content(objects, keys=keys):
            return sorted(tuple(item[key] for key in keys) for item in objects)

        same = [content(queries[i]) == content(references[j]) for i, j in enumerate(nearest.tolist())]
        result[f"same_{name}"] = sum(same) / len(same)
    return result
