"""
What the two caption pipelines share: images in any format → CLIP features, rounded token ids → clean text, and
saving/loading a pipeline folder so that it also runs where this package is not installed.

This file is written verbatim into every saved pipeline folder (and so into every Hub repository) beside the pipeline
module that imports it: it imports only torch, numpy, PIL, transformers, diffusers and huggingface_hub.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import HFValidationError
from transformers import CLIPVisionModelWithProjection, PreTrainedTokenizerBase
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.image_processing_utils import BaseImageProcessor

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor
OUTPUT_TYPES = ("str", "token_ids", "latent")
MODEL_INDEX_FILE = "model_index.json"

# Alpha is composited on white, the usual page background of transparent product shots and logos.
_BACKGROUND = (255, 255, 255)
# 65535 / 257 == 255 exactly, so this maps the full 16-bit range onto the full 8-bit range.
_UINT16_TO_UINT8 = 257
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_REPEATED_WORD = re.compile(r"\b(\w+)(\s+\1\b)+", flags=re.IGNORECASE)
# Libraries whose classes a saved pipeline names in model_index.json for its non-custom components.
_COMPONENT_LIBRARIES = ("diffusers", "transformers")


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Converts a loaded image of any common mode to 8-bit RGB.

    Transparent images (RGBA, LA, palette with transparency) are composited on white rather than having their alpha
    dropped, which would reveal arbitrary colors stored under fully transparent pixels. 16-bit images are rescaled
    from 0..65535 to 0..255 instead of being clipped, which would turn most of them white.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) / _UINT16_TO_UINT8
        gray = PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _array_to_pil(array: np.ndarray, index: int) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first → channels-last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"`images[{index}]` has shape {tuple(array.shape)}; expected (H, W), (H, W, C) or (C, H, W) with "
            "C in {1, 3, 4}."
        )
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"`images[{index}]` is a float array with values outside [0, 1].")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"`images[{index}]` has dtype {array.dtype}; expected uint8 or float in [0, 1].")
    return PIL.Image.fromarray(array)


def as_rgb_images(images: ImageInput | Sequence[ImageInput]) -> list[PIL.Image.Image]:
    """
    Normalises one image or a batch into a list of RGB PIL images.

    Accepts PIL images of any mode, numpy arrays (`(H, W)`, `(H, W, C)`, `(C, H, W)`; uint8 or float in [0, 1]),
    torch tensors of the same layouts or a 4-D batch `(B, C, H, W)`, and lists of any of these.
    """
    if isinstance(images, torch.Tensor):
        images = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    elif isinstance(images, PIL.Image.Image):
        images = [images]
    elif not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise TypeError(
            f"`images` must be a PIL image, numpy array, torch tensor or a list of them, got {type(images).__name__}."
        )
    if len(images) == 0:
        raise ValueError("`images` is empty; pass at least one image.")

    converted = []
    for index, image in enumerate(images):
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image, index)
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(
                f"`images[{index}]` is a {type(image).__name__}; expected a PIL image, numpy array or torch tensor."
            )
        converted.append(to_rgb(image))
    return converted


def check_image_embeds(image_embeds: torch.Tensor, config) -> None:
    """Raises a `ValueError` naming the expected shape when `image_embeds` do not fit a model reading
    `config.image_features` (pooled: `(batch, condition_dim)`; patches: `(batch, num_patches + 1, patch_dim)`)."""
    patches = config.image_features == "patches"
    width = config.patch_dim if patches else config.condition_dim
    if image_embeds.ndim != (3 if patches else 2) or image_embeds.shape[-1] != width or image_embeds.shape[0] == 0:
        expected = f"(batch_size >= 1, num_patches + 1, {width})" if patches else f"(batch_size >= 1, {width})"
        raise ValueError(
            f"`image_embeds` must have shape {expected} for image_features={config.image_features!r}, got "
            f"{tuple(image_embeds.shape)}."
        )


def check_vision_layer_exists(image_encoder: CLIPVisionModelWithProjection, vision_feature_layer: int) -> None:
    """Raises a `ValueError` unless `vision_feature_layer` indexes the hidden states of `image_encoder`."""
    num_layers = image_encoder.config.num_hidden_layers
    if not -(num_layers + 1) <= vision_feature_layer <= num_layers:
        raise ValueError(
            f"`vision_feature_layer` = {vision_feature_layer} does not exist in a vision tower of {num_layers} layers "
            f"(valid: {-(num_layers + 1)} to {num_layers})."
        )


@torch.no_grad()
def encode_pixel_values(
    image_encoder: CLIPVisionModelWithProjection,
    pixel_values: torch.FloatTensor,
    image_features: str = "pooled",
    vision_feature_layer: int = -1,
) -> torch.FloatTensor:
    """
    CLIP features of preprocessed images, on the encoder's device.

    `image_features="pooled"` gives the L2-normalised `image_embeds`, shape `(batch, projection_dim)`;
    `"patches"` gives the hidden states of [CLS] and every patch after layer `vision_feature_layer` (-1: the last)
    under the post-LayerNorm that CLIP applies to [CLS] before its projection, shape
    `(batch, num_patches + 1, hidden_size)`.
    """
    pixel_values = pixel_values.to(device=image_encoder.device, dtype=image_encoder.dtype)
    if image_features == "patches":
        check_vision_layer_exists(image_encoder, vision_feature_layer)
        outputs = image_encoder.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        return image_encoder.vision_model.post_layernorm(outputs.hidden_states[vision_feature_layer])
    if image_features != "pooled":
        raise ValueError(f"`image_features` must be 'pooled' or 'patches', got {image_features!r}.")
    outputs = image_encoder(pixel_values=pixel_values)
    return outputs.image_embeds / outputs.image_embeds.norm(dim=-1, keepdim=True)


def encode_images(
    image_encoder: CLIPVisionModelWithProjection,
    image_processor: BaseImageProcessor,
    images: ImageInput | Sequence[ImageInput],
    image_features: str = "pooled",
    vision_feature_layer: int = -1,
) -> torch.FloatTensor:
    """[`encode_pixel_values`] of images in any format [`as_rgb_images`] accepts."""
    pixel_values = image_processor(images=as_rgb_images(images), return_tensors="pt").pixel_values
    return encode_pixel_values(image_encoder, pixel_values, image_features, vision_feature_layer)


def collapse_repeated_words(caption: str) -> str:
    """"a a red red circle" → "a red circle": one caption at a time (the original code collapsed across the batch)."""
    return _REPEATED_WORD.sub(r"\1", caption)


def decode_captions(tokenizer: PreTrainedTokenizerBase, token_ids: torch.LongTensor) -> list[str]:
    """Token ids `(batch, caption_length)` → clean captions: special tokens dropped, repeats collapsed."""
    texts = tokenizer.batch_decode(token_ids.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=True)
    return [collapse_repeated_words(" ".join(text.split())) for text in texts]


def resolve_pipeline_folder(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> str:
    """A local folder as it is; a Hub id downloaded (or found in the cache) with `snapshot_download`."""
    folder = str(pretrained_model_name_or_path)
    if os.path.isdir(folder):
        return folder
    try:
        return snapshot_download(folder, **hub_kwargs)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"{folder!r} is neither a directory with a saved pipeline nor a Hub repository id ('user/repo')."
        ) from error


def read_model_index(folder: str) -> dict:
    index_path = os.path.join(folder, MODEL_INDEX_FILE)
    if not os.path.isfile(index_path):
        raise FileNotFoundError(f"{folder!r} is not a saved pipeline: it has no {MODEL_INDEX_FILE}.")
    with open(index_path, encoding="utf-8") as file:
        return json.load(file)


def check_pipeline_folder(
    folder: str, index: dict, components: Sequence[str], weighted: Sequence[str], allow_pickle: bool
) -> None:
    """Clear errors for a saved pipeline (`index` its `model_index.json`) with missing pieces, before the loaders
    report them obliquely."""
    missing = []
    for component in components:
        if component not in index:
            missing.append(f"model_index.json entry {component!r}")
        elif not os.path.isdir(os.path.join(folder, component)):
            missing.append(f"folder {component}/")
    for component in weighted:
        component_dir = os.path.join(folder, component)
        if not os.path.isdir(component_dir):
            continue
        files = os.listdir(component_dir)
        has_pickle = any(name.endswith(".bin") for name in files)
        if not any(name.endswith(".safetensors") for name in files) and not (allow_pickle and has_pickle):
            hint = " (pickle weights exist; pass allow_pickle=True to load them)" if has_pickle else ""
            missing.append(f"{component}/ safetensors weights{hint}")
    if missing:
        raise FileNotFoundError(f"The pipeline at {folder!r} is incomplete: missing {', '.join(missing)}.")


def load_components(
    pipeline_class: type,
    folder: str,
    model_auto_classes: dict[str, type],
    passed: dict,
    torch_dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """
    Every component of a saved pipeline folder, each loaded by its own class's `from_pretrained`.

    The custom model (the denoiser or the captioner) loads through the transformers Auto class given for it in
    `model_auto_classes`: where this package is installed its registered class is used, and the copy of its code in
    the folder runs only with `trust_remote_code=True`. The others load from the diffusers or transformers class that
    `model_index.json` names. Components in `passed` are used as given.
    """
    index = read_model_index(folder)
    expected = [name for name in inspect.signature(pipeline_class.__init__).parameters if name != "self"]
    check_pipeline_folder(folder, index, expected, [*model_auto_classes, "image_encoder"], allow_pickle)
    weights = {"use_safetensors": None if allow_pickle else True}
    if torch_dtype is not None:
        weights["dtype"] = torch_dtype
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if name in passed:
            components[name] = passed.pop(name)
        elif name in model_auto_classes:
            components[name] = model_auto_classes[name].from_pretrained(
                os.path.join(folder, name), trust_remote_code=trust_remote_code, **weights
            )
        elif entry[0] in _COMPONENT_LIBRARIES:
            component_class = getattr(importlib.import_module(entry[0]), entry[1])
            is_model = isinstance(component_class, type) and issubclass(component_class, torch.nn.Module)
            components[name] = component_class.from_pretrained(os.path.join(folder, name), **(weights if is_model else {}))
        else:
            raise ValueError(f"{MODEL_INDEX_FILE} of {folder!r} names {entry} for {name!r}: no library to load it from.")
    if passed:
        raise TypeError(f"Unexpected arguments {sorted(passed)} for loading a pipeline from {folder!r}.")
    return components


def _module_files(module_name: str) -> list[str]:
    """A module's file and, recursively, the files it imports relatively (`from .x import ...`)."""
    module_file = sys.modules[module_name].__file__
    return [module_file, *get_relative_import_files(module_file)]


def write_pipeline_code(pipeline, save_directory: str | os.PathLike, model_component: str) -> None:
    """
    Makes a saved pipeline folder load with diffusers alone (`DiffusionPipeline.from_pretrained(..., trust_remote_code=
    True)`): the pipeline's module and the files it imports are copied to the folder's root, `model_index.json` names
    that module as the pipeline's class, and the custom model by the module its folder holds (written there by
    transformers, with its configuration). The model's code goes to the root as well, for
    `AutoModel.from_pretrained(repo_id, subfolder=..., trust_remote_code=True)`.
    """
    model = getattr(pipeline, model_component)
    # transformers looks for a model's remote code at the repository root even when loading from a subfolder.
    for path in _module_files(type(pipeline).__module__) + _module_files(type(model).__module__):
        shutil.copyfile(path, os.path.join(save_directory, os.path.basename(path)))
    index_path = os.path.join(save_directory, MODEL_INDEX_FILE)
    with open(index_path, encoding="utf-8") as file:
        index = json.load(file)
    module_name = type(pipeline).__module__.rsplit(".", 1)[-1]
    index["_class_name"] = [module_name, type(pipeline).__name__]
    index[model_component] = [type(model).__module__.rsplit(".", 1)[-1], type(model).__name__]
    with open(index_path, "w", encoding="utf-8") as file:
        json.dump(index, file, indent=2, sort_keys=True)


# Functions `writer(folder, repo_id)` that add files to a saved folder before it is uploaded. Where this package is
# installed, it registers the writer of the model card, the Endpoint handler and its requirements; a repository's own
# copy of this file has none, and its uploads hold the saved pipeline only.
REPOSITORY_FILE_WRITERS: list = []


def upload_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    files: Callable[[Path], list[str]] | None = None,
):
    """
    Uploads a saved pipeline folder as one commit, everything with `token`: `repo_id` is created when missing (private
    if asked), `revision` when it is a new branch; the [`REPOSITORY_FILE_WRITERS`] add their files first. `files`
    chooses what of the folder is sent (relative POSIX paths); everything by default.

    Returns:
        `huggingface_hub.CommitInfo`: The commit.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    for writer in REPOSITORY_FILE_WRITERS:
        writer(folder, repo_id)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    folder = Path(folder)
    names = files(folder) if files else [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload pipeline",
        revision=revision,
        create_pr=create_pr,
    )


class CaptionPipelineMixin:
    """
    Loading, saving and pushing of the caption pipelines (put it before `DiffusionPipeline` in the bases): each
    component loads with its own class (the custom model through `model_auto_class`), and a save holds the pipeline's
    code so that it also loads where this package is not installed.
    """

    model_component: str  # "denoiser" or "captioner"
    model_auto_class: type  # the transformers Auto class that loads it

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """
        Loads a saved pipeline from a local folder or a Hub repository id (downloaded through the Hugging Face cache, so
        `HF_HUB_OFFLINE=1` works once it is cached). Each component loads with its own class; weights are read from
        safetensors only, unless `allow_pickle=True` is passed explicitly.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A folder written by [`save_pretrained`] or training, or a Hub id (`"user/repo"`).
            revision, cache_dir, token (*optional*):
                Passed to `huggingface_hub.snapshot_download` for a Hub id.
            torch_dtype (`torch.dtype`, *optional*):
                Load the models' weights in this dtype.
            allow_pickle (`bool`, *optional*, defaults to `False`):
                Also read `.bin` weights.
            trust_remote_code (`bool`, *optional*, defaults to `False`):
                Run the model code that the folder holds; needed only where this package is not installed.
            kwargs:
                Components to use instead of the saved ones (`scheduler=DDPMScheduler(...)`).
        """
        hub_kwargs = {name: kwargs.pop(name) for name in ("revision", "cache_dir", "token") if name in kwargs}
        options = {name: kwargs.pop(name) for name in ("torch_dtype", "allow_pickle", "trust_remote_code") if name in kwargs}
        folder = resolve_pipeline_folder(pretrained_model_name_or_path, **hub_kwargs)
        return cls(**load_components(cls, folder, {cls.model_component: cls.model_auto_class}, kwargs, **options))

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """
        Saves every component (weights as safetensors) with `model_index.json`, and this pipeline's code beside them,
        so that the folder also loads with `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` where
        this package is not installed. With `push_to_hub=True` the folder is then uploaded as diffusers does
        (`repo_id`, `private`, `token`, `commit_message`, `create_pr`).
        """
        push_kwargs = {name: kwargs.pop(name) for name in ("repo_id", "private", "token", "revision", "commit_message", "create_pr") if name in kwargs}
        super().save_pretrained(save_directory, safe_serialization=safe_serialization, variant=variant, **kwargs)
        write_pipeline_code(self, save_directory, self.model_component)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
            upload_folder_to_hub(save_directory, repo_id, **push_kwargs)

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
        when missing; private if asked). Where this package is installed the folder also gets the model card, the
        Inference Endpoints `handler.py` and its `requirements.txt`. To publish a training output with its metrics and
        examples on the card, push its folder instead (`clip-diffusionlm push DIR REPO_ID`).

        Args:
            repo_id (`str`):
                `"user/name"` (a bare name goes to your namespace).
            commit_message (`str`, *optional*):
                Defaults to "Upload pipeline".
            private (`bool`, *optional*):
                Visibility of a repository that has to be created.
            token (`str`, *optional*):
                A Hub token with write access, used for every call; defaults to the saved login or `HF_TOKEN`.
            create_pr (`bool`, *optional*, defaults to `False`):
                Open a pull request instead of committing.
            safe_serialization (`bool`, *optional*, defaults to `True`):
                Must stay `True` for a repository that loads without pickles.
            variant (`str`, *optional*):
                Weight file variant.
            revision (`str`, *optional*):
                Branch to commit to (created when missing).

        Returns:
            `huggingface_hub.CommitInfo`: The commit.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, safe_serialization=safe_serialization, variant=variant)
            return upload_folder_to_hub(
                folder, repo_id, commit_message=commit_message, private=private, token=token, revision=revision,
                create_pr=create_pr,
            )
