"""`CLIPDiffusionCaptionPipeline`: images → CLIP features → a few denoising steps in word-embedding space → text."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from transformers import CLIPVisionModelWithProjection, PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from .clip_features import ImageInput, check_image_embeds, encode_images
from .diffusion import predicted_original_sample
from .hub import (
    PIPELINE_MODULE_NAME,
    PIPELINE_MODULE_SOURCE,
    push_folder_to_hub,
    save_model_card,
    write_repository_code,
)
from .modeling_clip_diffusionlm import CLIPDiffusionLMModel

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("str", "token_ids", "latent")
_REPEATED_WORD = re.compile(r"\b(\w+)(\s+\1\b)+", flags=re.IGNORECASE)


def collapse_repeated_words(caption: str) -> str:
    """"a a red red circle" → "a red circle": one caption at a time (the original code collapsed across the batch)."""
    return _REPEATED_WORD.sub(r"\1", caption)


def decode_captions(tokenizer: PreTrainedTokenizerBase, token_ids: torch.LongTensor) -> list[str]:
    """Token ids `(batch, caption_length)` → clean captions: special tokens dropped, repeats collapsed."""
    texts = tokenizer.batch_decode(token_ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [collapse_repeated_words(" ".join(text.split())) for text in texts]


@dataclass
class CLIPDiffusionCaptionPipelineOutput(BaseOutput):
    """
    Output of [`CLIPDiffusionCaptionPipeline`].

    Args:
        captions (`list[str]`, `torch.LongTensor` or `torch.FloatTensor`):
            `batch_size · num_captions_per_image` results, image-major (the captions of image 0 first). With
            `output_type="str"` the caption strings; `"token_ids"` a tensor `(batch, caption_length)` of rounded ids;
            `"latent"` the final `x̂0` embeddings `(batch, caption_length, hidden_size)`.
    """

    captions: list[str] | torch.Tensor


class CLIPDiffusionCaptionPipeline(DiffusionPipeline):
    r"""
    Image captioning with CLIP-DiffusionLM.

    Args:
        denoiser ([`CLIPDiffusionLMModel`]):
            Predicts clean caption embeddings from noisy ones, conditioned on CLIP embeddings.
        scheduler ([`SchedulerMixin`]):
            A diffusers scheduler configured with `prediction_type="sample"` (DDIM by default; DDPM and others work).
        image_encoder ([`CLIPVisionModelWithProjection`]):
            The frozen CLIP image tower the denoiser was trained on.
        image_processor ([`CLIPImageProcessor`]):
            Resizes and normalises images for `image_encoder`.
        tokenizer ([`PreTrainedTokenizerBase`]):
            The denoiser's word-piece tokenizer, used to turn rounded ids into text.
    """

    model_cpu_offload_seq = "image_encoder->denoiser"
    _callback_tensor_inputs = ["noisy_embeds", "original_estimate", "image_embeds"]

    def __init__(
        self,
        denoiser: CLIPDiffusionLMModel,
        scheduler: SchedulerMixin,
        image_encoder: CLIPVisionModelWithProjection,
        image_processor: BaseImageProcessor,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.register_modules(
            denoiser=denoiser,
            scheduler=scheduler,
            image_encoder=image_encoder,
            image_processor=image_processor,
            tokenizer=tokenizer,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> CLIPDiffusionCaptionPipeline:
        """
        Loads a saved pipeline from a local directory or a Hub repository id (resolved through the Hugging Face cache,
        so `HF_HUB_OFFLINE=1` works once it is cached). Weights are read from safetensors only, unless
        `allow_pickle=True` is passed explicitly.
        """
        allow_pickle = kwargs.pop("allow_pickle", False)
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder):
            # diffusers refuses components from libraries it does not know on the Hub path; the files are the
            # same as a local save, so resolve the repository to its cached snapshot and load that.
            try:
                folder = snapshot_download(
                    folder,
                    revision=kwargs.pop("revision", None),
                    cache_dir=kwargs.get("cache_dir"),
                    token=kwargs.pop("token", None),
                )
            except HFValidationError as error:
                raise FileNotFoundError(
                    f"{folder!r} is neither a directory with a saved pipeline nor a Hub repository id ('user/repo')."
                ) from error
        _check_pipeline_folder(folder, allow_pickle=allow_pickle)
        # The module file written by `save_pretrained` imports this very package; any other content is not ours to
        # run without the user's say-so.
        module_path = os.path.join(folder, f"{PIPELINE_MODULE_NAME}.py")
        if os.path.isfile(module_path):
            with open(module_path, encoding="utf-8") as file:
                if file.read() == PIPELINE_MODULE_SOURCE:
                    kwargs.setdefault("trust_remote_code", True)
        return super().from_pretrained(folder, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """
        Saves what a Hub repository of this pipeline holds: every component (weights as safetensors),
        `model_index.json`, the pipeline module stub, the Inference Endpoints `handler.py` with its `requirements.txt`
        and the model card (`README.md`).

        Args:
            save_directory (`str` or `os.PathLike`):
                The folder to write (created if missing).
            safe_serialization (`bool`, *optional*, defaults to `True`):
                Weights as safetensors; `False` writes pickles, which are never uploaded.
            variant (`str`, *optional*):
                Weight file variant, e.g. `"fp16"`.
            push_to_hub (`bool`, *optional*, defaults to `False`):
                Upload the folder afterwards with [`~clip_diffusionlm.hub.push_folder_to_hub`]; `repo_id` (defaults
                to the folder's name in your namespace), `token`, `private`, `revision`, `commit_message` and
                `create_pr` are passed on.
        """
        hub_kwargs = {
            name: kwargs.pop(name)
            for name in ("token", "private", "revision", "commit_message", "create_pr")
            if name in kwargs
        }
        repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as file:
            index = json.load(file)
        index["_class_name"] = [PIPELINE_MODULE_NAME, type(self).__name__]
        with open(index_path, "w", encoding="utf-8") as file:
            json.dump(index, file, indent=2, sort_keys=True)
        write_repository_code(save_directory)
        if push_to_hub:
            push_folder_to_hub(save_directory, repo_id, **hub_kwargs)
        else:
            save_model_card(save_directory)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        revision: str | None = None,
    ):
        """
        Saves the pipeline to a temporary folder and uploads exactly that folder as one commit to `repo_id` (created
        when missing). To publish a training output with its metrics and examples on the card, push its folder
        instead (`clip-diffusionlm push DIR REPO_ID`).

        Args:
            repo_id (`str`):
                `"user/name"` (a bare name goes to your namespace).
            commit_message (`str`, *optional*):
                Defaults to "Upload CLIP-DiffusionLM pipeline".
            private (`bool`, *optional*):
                Visibility of a repository that has to be created.
            token (`str`, *optional*):
                A Hub token with write access; defaults to the saved login or `HF_TOKEN`.
            create_pr (`bool`, *optional*, defaults to `False`):
                Open a pull request instead of committing.
            safe_serialization (`bool`, *optional*, defaults to `True`):
                Must stay `True`: only safetensors are uploaded.
            variant (`str`, *optional*):
                Weight file variant.
            revision (`str`, *optional*):
                Branch to commit to (created when missing).

        Returns:
            `huggingface_hub.CommitInfo`: The commit.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return push_folder_to_hub(
                folder, repo_id, token=token, private=private, revision=revision, commit_message=commit_message,
                create_pr=create_pr,
            )

    def encode_images(self, images: ImageInput | Sequence[ImageInput]) -> torch.FloatTensor:
        """The CLIP features the denoiser reads (`config.image_features`) of PIL/numpy/torch images: L2-normalised
        `image_embeds` `(batch, condition_dim)`, or patch features `(batch, num_patches + 1, patch_dim)`."""
        config = self.denoiser.config
        return encode_images(
            self.image_encoder, self.image_processor, images, config.image_features, config.vision_feature_layer
        )

    def _guided_prediction(
        self,
        noisy_embeds: torch.FloatTensor,
        timestep: torch.Tensor,
        image_embeds: torch.FloatTensor,
        text_embeds: torch.FloatTensor | None,
        self_conditioning_embeds: torch.FloatTensor | None,
        guidance_scale: float,
    ) -> torch.FloatTensor:
        """`x̂0 = f(x|∅) + w·(f(x|c) − f(x|∅))`, both halves in one batch; `w = 1` runs the conditional pass only."""
        batch_size = noisy_embeds.shape[0]
        timesteps = timestep.to(noisy_embeds.device).expand(batch_size)
        if guidance_scale == 1.0:
            prediction = self.denoiser(
                noisy_embeds, timesteps, image_embeds, text_embeds, self_conditioning_embeds
            ).prediction
        else:

            def double(tensor: torch.Tensor | None) -> torch.Tensor | None:
                return None if tensor is None else torch.cat([tensor, tensor])

            drop_condition = torch.arange(2 * batch_size, device=noisy_embeds.device) >= batch_size
            both = self.denoiser(
                double(noisy_embeds),
                double(timesteps),
                double(image_embeds),
                double(text_embeds),
                double(self_conditioning_embeds),
                drop_condition,
            ).prediction
            conditional, unconditional = both.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        return predicted_original_sample(
            self.denoiser.config, self.scheduler.alphas_cumprod, prediction, noisy_embeds, timesteps
        )

    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        image_embeds: torch.FloatTensor | None = None,
        text_embeds: torch.FloatTensor | None = None,
        num_inference_steps: int = 5,
        guidance_scale: float = 1.0,
        num_captions_per_image: int = 1,
        num_refinement_steps: int = 0,
        clamp_to_vocabulary: bool = False,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "str",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> CLIPDiffusionCaptionPipelineOutput | tuple:
        r"""
        Captions images.

        Args:
            images (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                Images of any size and mode (RGB, grayscale, RGBA, ...). Arrays are `(H, W[, C])` or `(C, H, W)`,
                uint8 or float in [0, 1]; a 4-D array or tensor is a batch. Give either `images` or `image_embeds`.
            image_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)` or `(batch_size, num_patches + 1, patch_dim)`, *optional*):
                Precomputed CLIP features as [`encode_images`] returns them (e.g. from a feature cache): L2-normalised
                `image_embeds`, or patch features of layer `config.vision_feature_layer` for a denoiser with
                `image_features="patches"` (every layer has the same shape, so only the values tell them apart).
            text_embeds (`torch.FloatTensor` of shape `(batch_size, condition_dim)`, *optional*):
                CLIP text embeddings for a denoiser trained with `use_text_condition`; the learned null condition
                is used when omitted.
            num_inference_steps (`int`, *optional*, defaults to 5):
                Denoising steps; an `x0`-predicting model converges in fewer than 5.
            guidance_scale (`float`, *optional*, defaults to 1.0):
                Classifier-free guidance weight `w`: 1 is the conditional model alone, larger values push further
                from the unconditional prediction. Needs a model trained with `condition_drop_prob > 0`.
            num_captions_per_image (`int`, *optional*, defaults to 1):
                Independent samples per image.
            num_refinement_steps (`int`, *optional*, defaults to 0):
                The paper's refinement: after sampling, feed `x̂0` back through the denoiser at `t = 0` this many times.
            clamp_to_vocabulary (`bool`, *optional*, defaults to `False`):
                Replace `x̂0` by the nearest word embeddings at every step (Diffusion-LM's clamping trick).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes sampling deterministic.
            output_type (`str`, *optional*, defaults to `"str"`):
                `"str"`, `"token_ids"` or `"latent"`; see [`CLIPDiffusionCaptionPipelineOutput`].
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`CLIPDiffusionCaptionPipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after every denoising step as `callback_on_step_end(self, step_index, timestep,
                callback_kwargs)`, where `callback_kwargs` holds the tensors named in
                `callback_on_step_end_tensor_inputs`; tensors in the dict it returns replace the pipeline's own, so
                a callback can watch the caption form or steer it.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["original_estimate"]`):
                Any of `"noisy_embeds"` (`x_t` after the step), `"original_estimate"` (this step's `x̂0`) and
                `"image_embeds"` (the conditioning, repeated per caption).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["original_estimate"]
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {unknown}."
            )
        if (images is None) == (image_embeds is None):
            raise ValueError("Pass exactly one of `images` or `image_embeds`.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if not isinstance(num_captions_per_image, int) or num_captions_per_image < 1:
            raise ValueError(f"`num_captions_per_image` must be a positive integer, got {num_captions_per_image!r}.")
        if not isinstance(num_refinement_steps, int) or num_refinement_steps < 0:
            raise ValueError(f"`num_refinement_steps` must be a non-negative integer, got {num_refinement_steps!r}.")
        if guidance_scale < 0:
            raise ValueError(f"`guidance_scale` must be non-negative, got {guidance_scale}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        config = self.denoiser.config
        if guidance_scale != 1.0 and config.condition_drop_prob == 0:
            logger.warning(
                "guidance_scale != 1 on a denoiser trained without condition dropout: its null condition was never "
                "trained, so guidance will not help."
            )

        device, dtype = self._execution_device, self.denoiser.dtype
        if image_embeds is None:
            image_embeds = self.encode_images(images)
        check_image_embeds(image_embeds, config)
        if text_embeds is not None and text_embeds.shape != (image_embeds.shape[0], config.condition_dim):
            raise ValueError(
                f"`text_embeds` must have shape ({image_embeds.shape[0]}, {config.condition_dim}), got "
                f"{tuple(text_embeds.shape)}."
            )
        image_embeds = image_embeds.to(device, dtype).repeat_interleave(num_captions_per_image, dim=0)
        if text_embeds is not None:
            text_embeds = text_embeds.to(device, dtype).repeat_interleave(num_captions_per_image, dim=0)
        batch_size = image_embeds.shape[0]

        shape = (batch_size, config.caption_length, self.denoiser.hidden_size)
        noisy_embeds = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        noisy_embeds = noisy_embeds * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)

        original_estimate = None
        for step_index, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(noisy_embeds, timestep)
            original_estimate = self._guided_prediction(
                model_input, timestep, image_embeds, text_embeds, original_estimate, guidance_scale
            )
            if clamp_to_vocabulary:
                original_estimate = self.denoiser.nearest_word_embeddings(original_estimate)
            noisy_embeds = self.scheduler.step(
                original_estimate, timestep, noisy_embeds, generator=generator
            ).prev_sample
            if callback_on_step_end is not None:
                step_tensors = {"noisy_embeds": noisy_embeds, "original_estimate": original_estimate,
                                "image_embeds": image_embeds}
                callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                returned = callback_on_step_end(self, step_index, timestep, callback_kwargs) or {}
                noisy_embeds = returned.get("noisy_embeds", noisy_embeds)
                original_estimate = returned.get("original_estimate", original_estimate)
                image_embeds = returned.get("image_embeds", image_embeds)

        final_timestep = torch.zeros((), dtype=torch.long, device=device)
        for _ in range(num_refinement_steps):
            original_estimate = self._guided_prediction(
                original_estimate, final_timestep, image_embeds, text_embeds, original_estimate, guidance_scale
            )

        if output_type == "latent":
            result = original_estimate
        else:
            token_ids = self.denoiser.round_to_token_ids(original_estimate)
            result = token_ids if output_type == "token_ids" else decode_captions(self.tokenizer, token_ids)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (result,)
        return CLIPDiffusionCaptionPipelineOutput(captions=result)


def _check_pipeline_folder(folder: str, allow_pickle: bool) -> None:
    """Clear errors for a saved pipeline with missing pieces, before diffusers reports them obliquely."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder!r} is not a saved pipeline: it has no model_index.json.")
    with open(index_path, encoding="utf-8") as file:
        index = json.load(file)
    missing = []
    for component in ("denoiser", "scheduler", "image_encoder", "image_processor", "tokenizer"):
        if component not in index:
            missing.append(f"model_index.json entry {component!r}")
        elif not os.path.isdir(os.path.join(folder, component)):
            missing.append(f"folder {component}/")
    for component in ("denoiser", "image_encoder"):
        component_dir = os.path.join(folder, component)
        if not os.path.isdir(component_dir):
            continue
        files = os.listdir(component_dir)
        if not any(name.endswith(".safetensors") for name in files):
            if allow_pickle and any(name.endswith(".bin") for name in files):
                continue
            hint = " (pickle weights exist; pass allow_pickle=True to load them)" if any(
                name.endswith(".bin") for name in files
            ) else ""
            missing.append(f"{component}/ safetensors weights{hint}")
    if missing:
        raise FileNotFoundError(f"The pipeline at {folder!r} is incomplete: missing {', '.join(missing)}.")
