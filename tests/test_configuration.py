from __future__ import annotations

import pytest
from transformers import AutoConfig, BertConfig

from clip_diffusionlm import CLIPDiffusionLMConfig


def test_paper_defaults():
    config = CLIPDiffusionLMConfig()
    assert config.caption_length == 16
    assert config.condition_dim == 512
    assert config.fusion == "concat"
    assert config.rounding_weight == 0.3
    assert config.dynamic_rounding_constant is None
    assert config.prediction_type == "sample"
    assert config.prediction_step_offset == 100
    assert config.noise_schedule == "squaredcos_cap_v2"
    assert config.num_train_timesteps == 1000
    assert config.get_backbone_config().model_type == "distilbert"
    assert config.get_backbone_config().hidden_size == 768


def test_round_trip(tmp_path):
    config = CLIPDiffusionLMConfig(
        fusion="add",
        use_text_condition=True,
        condition_drop_prob=0.2,
        dynamic_rounding_constant=3.0,
        self_conditioning=True,
        backbone_config=BertConfig(hidden_size=64, num_attention_heads=4),
    )
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, CLIPDiffusionLMConfig)
    ignored = {"_name_or_path", "backbone_config", "transformers_version"}
    assert {k: v for k, v in reloaded.to_dict().items() if k not in ignored} == {
        k: v for k, v in config.to_dict().items() if k not in ignored
    }
    assert reloaded.get_backbone_config().to_diff_dict() == config.get_backbone_config().to_diff_dict()
    assert reloaded.get_backbone_config().hidden_size == 64


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fusion": "multiply"}, "fusion"),
        ({"rounding_weight": -0.1}, "rounding_weight"),
        ({"dynamic_rounding_constant": 0.0}, "dynamic_rounding_constant"),
        ({"condition_drop_prob": 1.0}, "condition_drop_prob"),
        ({"prediction_type": "epsilon"}, "prediction_type"),
        ({"noise_schedule": "quadratic"}, "noise_schedule"),
        ({"caption_length": 0}, "caption_length"),
        ({"caption_length": 1}, "caption_length"),
        ({"prediction_step_offset": 1000}, "prediction_step_offset"),
        ({"embedding_scale": 0}, "embedding_scale"),
        ({"rounding_logit_scale": -1.0}, "rounding_logit_scale"),
        ({"backbone_config": {"hidden_size": 8}}, "backbone_config"),
        ({"image_condition_tokens": 0}, "image_condition_tokens"),
        ({"image_condition_tokens": 4, "fusion": "add"}, "image_condition_tokens"),
        ({"gate_noisy_input": True, "timestep_conditioning": False}, "gate_noisy_input"),
        ({"rounding_transitions": True}, "rounding_transitions"),
        ({"image_transition_rank": 2}, "image_transition_rank.*rounding_transitions"),
        ({"image_transition_rank": -1}, "image_transition_rank"),
        ({"image_features": "grid"}, "image_features"),
        ({"image_features": "patches", "fusion": "add"}, "image_features"),
        ({"image_features": "patches", "patch_dim": 0}, "patch_dim"),
    ],
)
def test_invalid_knobs_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLIPDiffusionLMConfig(**kwargs)
