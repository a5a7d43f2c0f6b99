"""
The Inference Endpoints handler of a pushed pipeline: this file is the repository's `handler.py`, verbatim, so it
imports nothing of this package; it loads the repository's own pipeline code with diffusers.

Requests are `{"inputs": IMAGE or [IMAGE, ...], "parameters": {...}}` where an IMAGE is raw bytes, a base64 string
(optionally a `data:image/...;base64,` URL) or a PIL image; the response holds `[{"generated_text": ...}, ...]` per
image (one entry per caption).
"""

# No `from __future__ import annotations`: Inference Endpoints execute this file without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations.

import base64
import binascii
import io
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline

MAX_IMAGE_BYTES = 8 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGES_PER_REQUEST = 8


class HandlerError(ValueError):
    """A request the handler refuses; its message says what was wrong and what is expected."""

    status_code = 400


class PayloadTooLargeError(HandlerError):
    """An image (or request) over the size limits."""

    status_code = 413


@dataclass(frozen=True)
class Parameter:
    """One request parameter: its type and inclusive range."""

    kind: type
    minimum: float
    maximum: float
    default: float | None  # None: not passed, so the pipeline's own default applies

    def parse(self, name: str, value: Any) -> int | float:
        # bool is an int subclass, and a float is no integer: both are mistakes in a request, not values.
        accepted = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, accepted) or not self.minimum <= value <= self.maximum:
            kind = "an integer" if self.kind is int else "a number"
            raise HandlerError(
                f"parameters.{name} must be {kind} in [{self.minimum}, {self.maximum}], got {value!r}."
            )
        return self.kind(value)


PARAMETERS = {
    # None: the pipeline's own default, its recommended setting.
    "num_inference_steps": Parameter(int, 1, 100, None),
    "guidance_scale": Parameter(float, 0.0, 20.0, 1.0),
    "no_repeat_ngram_size": Parameter(int, 0, 8, None),
    "length_bonus": Parameter(float, -5.0, 5.0, None),
    "num_captions_per_image": Parameter(int, 1, 8, 1),
    "seed": Parameter(int, 0, 2**63 - 1, 0),
}


def parse_parameters(parameters: Any) -> dict[str, int | float]:
    """A request's `parameters` with defaults filled in; unknown names, wrong types and out-of-range values raise."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise HandlerError(f"`parameters` must be an object, got {type(parameters).__name__}.")
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise HandlerError(f"Unknown parameters {unknown}; expected any of {sorted(PARAMETERS)}.")
    return {
        name: spec.parse(name, parameters[name]) if name in parameters else spec.default
        for name, spec in PARAMETERS.items()
    }


def read_image(
    item: Any, name: str, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS
) -> PIL.Image.Image:
    """
    One request image as a decoded PIL image (of any mode: the pipeline converts it). The encoded size and the pixel count (from the header, before anything is
    decoded, so decompression bombs are refused cheaply) are checked against the limits.

    Args:
        item (`bytes`, `str` or `PIL.Image.Image`):
            Raw image bytes, base64 (optionally a data URL) or an image.
        name (`str`):
            Where the item is in the request, for error messages (`"inputs[1]"`).
    """
    if isinstance(item, PIL.Image.Image):
        image = item
    else:
        if isinstance(item, str):
            encoded = item.split(",", 1)[1] if item.startswith("data:") else item
            if len(encoded) > (max_bytes + 2) // 3 * 4:
                raise PayloadTooLargeError(f"{name} is over the limit of {max_bytes} bytes per image.")
            try:
                item = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise HandlerError(f"{name} is a string but not valid base64 image data.") from None
        if not isinstance(item, (bytes, bytearray)):
            raise HandlerError(
                f"{name} must be image bytes, a base64 string or a PIL image, got {type(item).__name__}."
            )
        if len(item) > max_bytes:
            raise PayloadTooLargeError(f"{name} has {len(item)} bytes, over the limit of {max_bytes} per image.")
        with warnings.catch_warnings():
            # PIL's own bomb check only warns below twice its limit; ours below is stricter anyway.
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            try:
                image = PIL.Image.open(io.BytesIO(item))
            except PIL.Image.DecompressionBombError:
                raise PayloadTooLargeError(f"{name} has too many pixels (a decompression bomb?).") from None
            except (PIL.UnidentifiedImageError, OSError):
                raise HandlerError(f"{name} is not an image that can be read (PNG, JPEG, WebP, GIF, ...).") from None
    if image.width * image.height > max_pixels:
        raise PayloadTooLargeError(
            f"{name} is {image.width}×{image.height} pixels, over the limit of {max_pixels} pixels."
        )
    try:
        image.load()
        return image
    except (OSError, ValueError, SyntaxError):
        raise HandlerError(f"{name} is a damaged or truncated image.") from None


class EndpointHandler:
    """
    Captions images for Inference Endpoints (and `clip_diffusionlm.hub.serving.create_app`).

    Args:
        path (`str`, *optional*, defaults to `""`):
            The saved pipeline (the repository folder on an endpoint).
        max_image_bytes (`int`, *optional*, defaults to 8 MiB):
            Largest encoded image accepted.
        max_image_pixels (`int`, *optional*, defaults to 4096 × 4096):
            Largest image accepted, in pixels.
    """

    def __init__(self, path: str = "", max_image_bytes: int = MAX_IMAGE_BYTES, max_image_pixels: int = MAX_IMAGE_PIXELS):
        # The repository's own pipeline and denoiser code (the folder an Endpoint serves is the user's repository).
        self.pipe = DiffusionPipeline.from_pretrained(path or os.getcwd(), trust_remote_code=True)
        self.pipe.set_progress_bar_config(disable=True)
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        # A request of base64 images with JSON around them, at most this long.
        self.max_request_bytes = MAX_IMAGES_PER_REQUEST * ((max_image_bytes + 2) // 3 * 4) + 64 * 1024
        # The scheduler keeps the timesteps of the call in progress, so calls from a server's threads take turns.
        self._lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> list[dict[str, str]] | list[list[dict[str, str]]]:
        """
        Args:
            data (`dict`):
                `{"inputs": IMAGE or [IMAGE, ...], "parameters": {"num_inference_steps": 1, "guidance_scale": 1.0,
                "no_repeat_ngram_size": 3, "length_bonus": 1.0, "num_captions_per_image": 1, "seed": 0}}`; every
                parameter is optional (`num_inference_steps`, `no_repeat_ngram_size` and `length_bonus` default to the
                pipeline's recommended setting).

        Returns:
            `list`: For one image, `[{"generated_text": caption}, ...]` (one per caption); for a list of images, one
            such list per image.

        Raises:
            [`HandlerError`]: for a request that cannot be served, with a message naming the offending field.
        """
        if not isinstance(data, dict) or "inputs" not in data:
            raise HandlerError('The request must be a JSON object {"inputs": ..., "parameters": {...}}.')
        inputs = data["inputs"]
        single = not isinstance(inputs, list)
        items = [inputs] if single else inputs
        if not 1 <= len(items) <= MAX_IMAGES_PER_REQUEST:
            raise HandlerError(f"`inputs` must hold 1 to {MAX_IMAGES_PER_REQUEST} images, got {len(items)}.")
        parameters = parse_parameters(data.get("parameters"))
        images = [
            read_image(item, "inputs" if single else f"inputs[{index}]", self.max_image_bytes, self.max_image_pixels)
            for index, item in enumerate(items)
        ]
        per_image = parameters["num_captions_per_image"]
        seed = parameters.pop("seed")
        pipeline_arguments = {name: value for name, value in parameters.items() if value is not None}
        with self._lock:
            captions = self.pipe(
                images, **pipeline_arguments, generator=torch.Generator().manual_seed(seed)
            ).captions
        results = [
            [{"generated_text": caption} for caption in captions[index * per_image : (index + 1) * per_image]]
            for index in range(len(images))
        ]
        return results[0] if single else results
