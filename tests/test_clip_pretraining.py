"""The toy CLIP's training objective: hard-negative captions and the contrastive loss that ranks them."""

from __future__ import annotations

import pytest
import torch
from transformers import BertTokenizer

from clip_diffusionlm.demo import content_accuracy
from clip_diffusionlm.demo.clip_pretraining import build_clip, contrastive_loss, hard_negative
from clip_diffusionlm.demo.shapes_world import COLOUR_SYNONYMS, SHAPE_SYNONYMS, contradicting_words

SWAPS = contradicting_words()
ONE_RED_CIRCLE = [{"shape": "circle", "colour": "red", "size": "small"}]
RED_CIRCLE_BLUE_STAR = [{"shape": "circle", "colour": "red", "size": "small"},
                        {"shape": "star", "colour": "blue", "size": "large"}]


def test_contradicting_words_cover_every_attribute_word_and_never_a_synonym():
    for synonyms in (COLOUR_SYNONYMS, SHAPE_SYNONYMS):
        for name, words in synonyms.items():
            for word in words:
                assert set(SWAPS[word]).isdisjoint(words)
                assert len(SWAPS[word]) == sum(len(w) for other, w in synonyms.items() if other != name)
    assert SWAPS["boxes"] == ["circles", "discs", "triangles", "stars", "crosses", "diamonds"]


def test_a_single_swap_makes_the_caption_false():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        negative = hard_negative("a small red circle, on a light background", SWAPS, generator)
        assert negative.endswith(", on a light background")  # the comma stays with its position
        assert content_accuracy([negative], [ONE_RED_CIRCLE])["object_accuracy"] == 0.0


def test_two_contradicting_words_trade_places():
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(30):
        seen.add(hard_negative("a red circle and a blue star", SWAPS, generator))
    assert seen == {"a blue circle and a red star", "a red star and a blue circle"}
    for negative in seen:
        assert content_accuracy([negative], [RED_CIRCLE_BLUE_STAR])["object_accuracy"] == 0.0


def test_no_negative_without_a_swappable_word():
    assert hard_negative("an empty picture", SWAPS, torch.Generator()) is None


def test_contrastive_loss_without_negatives_is_clips_own_loss(tmp_path):
    from clip_diffusionlm.demo.clip_pretraining import CLIPPretrainingConfig

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "blue", "circle"]))
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    config = CLIPPretrainingConfig(image_size=32, patch_size=16, hidden_size=32, num_layers=1, projection_dim=16)
    model = build_clip(config, tokenizer).eval()
    tokens = tokenizer(["a red circle", "a blue circle", "a circle"], padding=True, return_tensors="pt")
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    output = model(**tokens, pixel_values=pixel_values, return_loss=True)
    torch.testing.assert_close(contrastive_loss(output.logits_per_image, 3), output.loss)

    # A negative identical to image 0's caption is as likely as its positive, so the loss must grow.
    logits = torch.cat([output.logits_per_image, output.logits_per_image[:, :1]], dim=1)
    assert contrastive_loss(logits, 3) > output.loss


def test_contrastive_texts_draw_from_the_first_references_then_add_negatives():
    from clip_diffusionlm.demo.clip_pretraining import CLIPPretrainingConfig, contrastive_texts

    references = [["a red circle", "a big red disc", "there is a red circle"], ["a blue star", "one blue star"]] * 20
    drawn = set()
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        drawn.update(contrastive_texts(references, CLIPPretrainingConfig(), generator))
    assert {"a big red disc", "there is a red circle", "one blue star"} <= drawn

    config = CLIPPretrainingConfig(captions_per_image=1, hard_negative_swaps=contradicting_words())
    texts = contrastive_texts(references, config, torch.Generator().manual_seed(0))
    assert texts[:40] == [captions[0] for captions in references]
    assert len(texts) == 80 and all(negative not in ("a red circle", "a blue star") for negative in texts[40:])

    with pytest.raises(ValueError, match="captions_per_image"):
        CLIPPretrainingConfig(captions_per_image=0)


def test_length_grouped_logits_equal_clips_own(tmp_path):
    """Encoding the texts in length groups, each cut after its longest text, must not change a single logit."""
    from clip_diffusionlm.demo.clip_pretraining import CLIPPretrainingConfig, contrastive_logits

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "red", "blue", "circle", "star", "and", "big"]
    (tmp_path / "vocab.txt").write_text("\n".join(words))
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    config = CLIPPretrainingConfig(image_size=32, patch_size=16, hidden_size=32, num_layers=2, projection_dim=16)
    model = build_clip(config, tokenizer).eval()
    texts = ["a red circle", "a big blue star and a red circle", "star", "a blue star and a big red circle and a star",
             "a circle", "red and blue"]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = model(**tokens, pixel_values=pixel_values).logits_per_image
    grouped = contrastive_logits(model, tokens.input_ids, tokens.attention_mask, pixel_values, num_length_groups=3)
    torch.testing.assert_close(grouped, expected)

