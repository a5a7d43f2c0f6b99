"""
The model families the training loop trains: what differs between CLIP-DiffusionLM and its autoregressive twin, behind
one small interface, so that the loop in `training.py` reads the same for both and has no branch on the family.

A family builds its model on the pretrained text backbone, computes its loss on a batch, wraps the model in its
pipeline, captions the validation features and writes what its saved folder holds besides the pipeline. Step
distillation (`distill_from`) is a third: a diffusion model that starts as a trained one and learns its few-step sampler.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from transformers import CLIPVisionModelWithProjection, PreTrainedModel

from .diffusion import (
    INFERENCE_SCHEDULERS,
    DiffusionLossOutput,
    TimeWarping,
    diffusion_loss,
    distillation_loss,
    make_noise_scheduler,
)
from .evaluation import caption_embeddings
from .hub.model_card import write_model_card
from .models.configuration_clip_captioner_ar import CLIPCaptionerARConfig
from .models.modeling_clip_captioner_ar import CLIPCaptionerARForCausalLM, captioner_loss
from .models.modeling_clip_diffusionlm import CLIPDiffusionLMModel
from .pipelines.pipeline_clip_ar_caption import CLIPARCaptionPipeline
from .pipelines.pipeline_clip_diffusion_caption import CLIPDiffusionCaptionPipeline
from .training_args import TrainingConfig


class ModelFamily:
    """
    What the training loop needs of a model family. Subclasses implement each method; `model_class` is the
    `PreTrainedModel` the family trains.
    """

    model_class: type[PreTrainedModel]

    def model_kwargs(self, config: TrainingConfig, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The run's model configuration (`config.model_config` over the CLIP-derived sizes) as this family's."""
        return model_kwargs

    def build(
        self, config: TrainingConfig, image_encoder: CLIPVisionModelWithProjection, rounding_vocabulary: list[int] | None
    ) -> PreTrainedModel:
        """The model on the pretrained text backbone, sized for the CLIP it reads."""
        model_kwargs = self.model_kwargs(config, {
            "condition_dim": image_encoder.config.projection_dim,
            "patch_dim": image_encoder.config.hidden_size,
            "rounding_vocabulary": rounding_vocabulary,
            **config.model_config,
        })
        pretrained = self.model_class.from_text_backbone(
            config.text_backbone, num_backbone_layers=config.text_backbone_layers, **model_kwargs
        )
        if config.attn_implementation is not None:
            pretrained.set_attn_implementation(config.attn_implementation)
        if not config.init_backbone_weights:
            # The original code's set-up: pretrained (frozen) word embeddings, randomly initialised transformer layers.
            model = self.model_class(pretrained.config)
            model.get_input_embeddings().weight.data.copy_(pretrained.get_input_embeddings().weight)
            pretrained = model
        if config.gradient_checkpointing:
            pretrained.gradient_checkpointing_enable()
        return pretrained

    def noise_scheduler(self, model: PreTrainedModel) -> DDPMScheduler | None:
        """The training noise schedule, for a family that has one."""
        raise NotImplementedError

    def loss(self, run, model: torch.nn.Module, input_ids, image_embeds, text_embeds=None, reference_ids=None):
        """The objective on a batch: an output with `.loss` and the terms the loop logs. `reference_ids` (every
        reference of each caption's image) come only with `config.reference_selection`, a diffusion option."""
        raise NotImplementedError

    def pipeline(self, run) -> DiffusionPipeline:
        """The pipeline around the run's current model (EMA weights when they are swapped in)."""
        raise NotImplementedError

    def validation_captions(self, run, features: torch.Tensor) -> list[list[str]]:
        """One list of sampled captions per validation image."""
        raise NotImplementedError

    def write_extras(self, run, pipe: DiffusionPipeline) -> None:
        """Whatever the saved folder holds besides the pipeline and the training record."""


def learn_timestep_density(run, output: DiffusionLossOutput) -> None:
    """Feeds a time-warping run's sampler the batch's rounding losses, every process's, so that all processes go on
    drawing from one density."""
    if isinstance(run.timestep_sampling, TimeWarping):
        timesteps, losses = run.accelerator.gather((output.timesteps, output.rounding_loss_per_caption.detach()))
        run.timestep_sampling.update(timesteps, losses, run.noise_scheduler.config.num_train_timesteps)


class DiffusionFamily(ModelFamily):
    """CLIP-DiffusionLM: the diffusion objective, sampled with the run's inference scheduler; its folder has a card."""

    model_class = CLIPDiffusionLMModel

    def noise_scheduler(self, model: CLIPDiffusionLMModel) -> DDPMScheduler:
        return make_noise_scheduler(model.config, DDPMScheduler)

    def loss(self, run, model, input_ids, image_embeds, text_embeds=None, reference_ids=None):
        output = diffusion_loss(
            model, run.noise_scheduler, input_ids, image_embeds, text_embeds,
            timesteps_per_caption=run.config.timesteps_per_caption, timestep_sampling=run.timestep_sampling,
            draft_prob=run.config.draft_prob, mask_predict_prob=run.config.mask_predict_prob,
            reference_ids=reference_ids,
        )
        learn_timestep_density(run, output)
        return output

    def pipeline(self, run) -> CLIPDiffusionCaptionPipeline:
        pipe = CLIPDiffusionCaptionPipeline(
            denoiser=run.model,
            scheduler=make_noise_scheduler(run.model.config, INFERENCE_SCHEDULERS[run.config.inference_scheduler]),
            image_encoder=run.data.image_encoder,
            image_processor=run.data.image_processor,
            tokenizer=run.data.tokenizer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validation_captions(self, run, features):
        return caption_embeddings(
            self.pipeline(run), features, run.config.validation_inference_steps, run.config.validation_guidance_scale,
            seed=run.config.seed,
        )

    def write_extras(self, run, pipe):
        write_model_card(run.output_dir, pipe, run.config, run.data.dataset)


class AutoregressiveFamily(ModelFamily):
    """The AR baseline: next-token cross-entropy, greedy `generate()`; its folder keeps the training record only."""

    model_class = CLIPCaptionerARForCausalLM

    def model_kwargs(self, config, model_kwargs):
        return CLIPCaptionerARConfig.shared_kwargs(model_kwargs)

    def noise_scheduler(self, model) -> None:
        return None

    def loss(self, run, model, input_ids, image_embeds, text_embeds=None, reference_ids=None):
        return captioner_loss(model, input_ids, image_embeds)

    def pipeline(self, run) -> CLIPARCaptionPipeline:
        return CLIPARCaptionPipeline(
            captioner=run.model, image_encoder=run.data.image_encoder, image_processor=run.data.image_processor,
            tokenizer=run.data.tokenizer,
        )

    def validation_captions(self, run, features):
        # Greedy, all validation images in one `generate()`.
        return [[caption] for caption in self.pipeline(run)(image_embeds=features).captions]


class StepDistillationFamily(DiffusionFamily):
    """
    CLIP-DiffusionLM distilled from a trained one (`config.distill_from`): the student starts as a copy of the teacher's
    denoiser, and one of its steps learns what `config.distillation_teacher_steps` teacher DDIM steps reach
    ([`distillation_loss`]). Saved, validated and carded like any diffusion model. One instance per run: it holds the
    frozen teacher.
    """

    def __init__(self):
        self.teacher: CLIPDiffusionLMModel | None = None

    def build(self, config, image_encoder, rounding_vocabulary):
        self.teacher = CLIPDiffusionLMModel.from_pretrained(config.distill_from, subfolder="denoiser")
        # Placed once, beside the frozen CLIP on the run's device; the student is placed by Accelerate.
        self.teacher.requires_grad_(False).eval().to(image_encoder.device)
        if self.teacher.config.prediction_type != "sample":
            raise ValueError(
                f"distill_from={config.distill_from!r} predicts {self.teacher.config.prediction_type!r}; step "
                "distillation needs an x0 predictor (prediction_type='sample')."
            )
        student = CLIPDiffusionLMModel.from_pretrained(config.distill_from, subfolder="denoiser")
        if config.attn_implementation is not None:
            for model in (self.teacher, student):
                model.set_attn_implementation(config.attn_implementation)
        if config.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        return student

    def loss(self, run, model, input_ids, image_embeds, text_embeds=None, reference_ids=None):
        output = distillation_loss(
            model, self.teacher, run.noise_scheduler, input_ids, image_embeds, text_embeds,
            teacher_steps=run.config.distillation_teacher_steps, timesteps_per_caption=run.config.timesteps_per_caption,
            timestep_sampling=run.timestep_sampling,
        )
        learn_timestep_density(run, output)
        return output


MODEL_FAMILIES: dict[str, ModelFamily] = {"diffusion": DiffusionFamily(), "ar": AutoregressiveFamily()}


def model_family(config: TrainingConfig) -> ModelFamily:
    """The family that trains `config`: a fresh step-distillation one when it distils, else its `model_type`'s."""
    return StepDistillationFamily() if config.distill_from is not None else MODEL_FAMILIES[config.model_type]
