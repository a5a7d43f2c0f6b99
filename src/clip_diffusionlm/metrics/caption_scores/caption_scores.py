"""`evaluate` metric wrapping `clip_diffusionlm.metrics.compute_caption_metrics` (COCO caption metrics, offline).

Load it with `evaluate.load(clip_diffusionlm.metrics.CAPTION_METRIC_PATH)`. `evaluate` copies this script into its
modules cache and imports it from there, so it imports the installed package absolutely and keeps no logic of its own.
"""

from __future__ import annotations

from typing import Any

import datasets
import evaluate

from clip_diffusionlm.metrics.caption_metrics import compute_caption_metrics

_DESCRIPTION = """\
COCO caption metrics computed offline with pycocoevalcap, the code of the COCO caption evaluation server: BLEU-1..4,
METEOR 1.5, ROUGE-L and CIDEr-D, on captions cleaned of BERT/CLIP special tokens, lowercased and tokenised by the
Stanford PTB tokenizer (Java). Without Java, a Python tokenizer that mimics it is used for BLEU, ROUGE-L and CIDEr and
METEOR is skipped. SPICE needs a model download and is always reported as None. Everything skipped or replaced is
listed, with the reason, under "skipped".
"""

_CITATION = """\
@article{chen2015microsoft,
  title   = {Microsoft {COCO} Captions: Data Collection and Evaluation Server},
  author  = {Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
             Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal = {arXiv preprint arXiv:1504.00325},
  year    = {2015}
}
@inproceedings{vedantam2015cider,
  title     = {{CIDEr}: Consensus-based Image Description Evaluation},
  author    = {Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {4566--4575},
  year      = {2015}
}
@inproceedings{papineni2002bleu,
  title     = {{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author    = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {Proceedings of the 40th Annual Meeting of the Association for Computational Linguistics},
  pages     = {311--318},
  year      = {2002}
}
@inproceedings{denkowski2014meteor,
  title     = {Meteor Universal: Language Specific Translation Evaluation for Any Target Language},
  author    = {Denkowski, Michael and Lavie, Alon},
  booktitle = {Proceedings of the Ninth Workshop on Statistical Machine Translation},
  pages     = {376--380},
  year      = {2014}
}
@inproceedings{lin2004rouge,
  title     = {{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author    = {Lin, Chin-Yew},
  booktitle = {Text Summarization Branches Out},
  pages     = {74--81},
  year      = {2004}
}
"""

_KWARGS_DESCRIPTION = """
Scores one generated caption per image against that image's reference captions.

Args:
    predictions (`list[str]`):
        One generated caption per image. Empty captions are legal and score 0.
    references (`list[list[str]]`):
        For each image, a non-empty list of reference captions.
    metrics (`list[str]`, *optional*, defaults to `None`):
        Subset of "BLEU", "METEOR", "ROUGE-L", "CIDEr", "SPICE" to compute; `None` computes all of them.

Returns:
    "BLEU-1" .. "BLEU-4", "METEOR", "ROUGE-L" (floats in [0, 1]), "CIDEr" (float, pycocoevalcap's CIDEr-D scale of
    10 x mean cosine similarity, typically 0..~3), "CIDEr_per_image" (list of floats), "SPICE" (always None) and
    "skipped" (dict: metric or component name -> reason it was skipped or replaced). Skipped metrics are None.

Examples:
    >>> import evaluate
    >>> from clip_diffusionlm.metrics import CAPTION_METRIC_PATH
    >>> metric = evaluate.load(CAPTION_METRIC_PATH)
    >>> results = metric.compute(
    ...     predictions=["a dog runs on the grass", "two cats sleep on a sofa"],
    ...     references=[["a dog running on grass", "a brown dog runs"], ["two cats sleeping on a couch"]],
    ... )
    >>> sorted(results["skipped"])
    ['SPICE']
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionScores(evaluate.Metric):
    """COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) through `compute_caption_metrics`."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            codebase_urls=["https://github.com/salaniz/pycocoevalcap", "https://github.com/tylin/coco-caption"],
            reference_urls=["https://arxiv.org/abs/1504.00325", "https://arxiv.org/abs/1411.5726"],
        )

    def _compute(
        self, predictions: list[str], references: list[list[str]], metrics: list[str] | None = None
    ) -> dict[str, Any]:
        return compute_caption_metrics(predictions, references, metrics=metrics)
