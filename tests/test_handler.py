"""The Inference Endpoints handler, loaded from a saved repository's handler.py and served over real HTTP."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import torch
import uvicorn
from conftest import tiny_pipeline

from clip_diffusionlm.hub import write_published_files
from clip_diffusionlm.hub.serving import create_app

MAX_IMAGE_BYTES = 60_000
MAX_IMAGE_PIXELS = 1_000_000


def png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


RED = png(PIL.Image.new("RGB", (40, 30), (255, 0, 0)))
BLUE = png(PIL.Image.new("RGB", (32, 32), (0, 0, 255)))


@pytest.fixture(scope="module")
def handler(tokenizer, tmp_path_factory):
    """`EndpointHandler` imported from the published repository's handler.py, the way Inference Endpoints load it."""
    folder = tmp_path_factory.mktemp("repo")
    tiny_pipeline(tokenizer).save_pretrained(folder)
    write_published_files(folder, "someone/tiny")
    spec = importlib.util.spec_from_file_location("handler", folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(folder), max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS)


@pytest.fixture(scope="module")
def server(handler):
    """The handler's app in uvicorn on 127.0.0.1 (a free port), in a background thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(handler), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)


def post(url: str, body: bytes | dict, content_type: str | None = None) -> tuple[int, object]:
    if isinstance(body, dict):
        body, content_type = json.dumps(body).encode(), "application/json"
    request = urllib.request.Request(url + "/", data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def direct(handler, image: bytes, **parameters) -> list:
    return handler({"inputs": PIL.Image.open(io.BytesIO(image)), "parameters": parameters})


def test_raw_bytes_base64_data_url_and_pil_give_the_same_caption(server, handler):
    expected = direct(handler, RED)
    assert len(expected) == 1 and isinstance(expected[0]["generated_text"], str)
    assert post(server, RED, "image/png") == (200, expected)
    assert post(server, {"inputs": base64.b64encode(RED).decode()}) == (200, expected)
    data_url = "data:image/png;base64," + base64.b64encode(RED).decode()
    assert post(server, {"inputs": data_url, "parameters": {}}) == (200, expected)


def test_parameters_and_batches(server, handler):
    parameters = {"num_inference_steps": 2, "guidance_scale": 1.5, "num_captions_per_image": 3, "seed": 7}
    status, body = post(server, {"inputs": base64.b64encode(RED).decode(), "parameters": parameters})
    assert status == 200 and body == direct(handler, RED, **parameters) and len(body) == 3
    status, body = post(server, {"inputs": [base64.b64encode(RED).decode(), base64.b64encode(BLUE).decode()],
                                 "parameters": {"num_captions_per_image": 2}})
    assert status == 200 and [len(captions) for captions in body] == [2, 2]
    images = [PIL.Image.open(io.BytesIO(image)) for image in (RED, BLUE)]
    assert body == handler({"inputs": images, "parameters": {"num_captions_per_image": 2}})


def test_no_repeat_ngram_size_reaches_the_pipeline(server, handler):
    image = PIL.Image.open(io.BytesIO(RED))

    def from_the_pipeline(size: int) -> list[dict[str, str]]:
        captions = handler.pipe(image, no_repeat_ngram_size=size, generator=torch.Generator().manual_seed(0)).captions
        return [{"generated_text": caption} for caption in captions]

    assert from_the_pipeline(0) != from_the_pipeline(1)  # the untrained tiny model repeats its words
    for size in (0, 1):
        request = {"inputs": base64.b64encode(RED).decode(), "parameters": {"no_repeat_ngram_size": size}}
        assert post(server, request) == (200, from_the_pipeline(size))


def test_length_bonus_reaches_the_pipeline(server, handler):
    image = PIL.Image.open(io.BytesIO(RED))

    def from_the_pipeline(bonus: float) -> list[dict[str, str]]:
        captions = handler.pipe(image, length_bonus=bonus, generator=torch.Generator().manual_seed(0)).captions
        return [{"generated_text": caption} for caption in captions]

    assert from_the_pipeline(-5.0) != from_the_pipeline(0.0)
    for bonus in (-5.0, 0.0):
        request = {"inputs": base64.b64encode(RED).decode(), "parameters": {"length_bonus": bonus}}
        assert post(server, request) == (200, from_the_pipeline(bonus))


def _bomb() -> bytes:
    """A small PNG that decodes to 25 million pixels."""
    return png(PIL.Image.new("L", (5000, 5000), 0))


BAD_REQUESTS = [
    ("oversize", lambda: (png(PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3),
                                                                                   dtype=np.uint8))), "image/png"),
     413, "over the limit"),
    ("decompression bomb", lambda: (_bomb(), "image/png"), 413, "pixels"),
    ("not an image", lambda: (b"%PDF-1.4 not an image", "application/octet-stream"), 400, "not an image"),
    ("truncated", lambda: (RED[: len(RED) // 2], "image/png"), 400, "damaged or truncated"),
    ("bad base64", lambda: ({"inputs": "not base64!"},), 400, "base64"),
    ("bad json", lambda: (b"{inputs:", "application/json"), 400, "not valid JSON"),
    ("no inputs", lambda: ({"image": "x"},), 400, '"inputs"'),
    ("wrong input type", lambda: ({"inputs": 3},), 400, "inputs must be image bytes"),
    ("too many images", lambda: ({"inputs": [base64.b64encode(RED).decode()] * 9},), 400, "1 to 8 images"),
    ("steps as text", lambda: ({"inputs": base64.b64encode(RED).decode(),
                                "parameters": {"num_inference_steps": "5"}},), 400, "num_inference_steps"),
    ("steps out of range", lambda: ({"inputs": base64.b64encode(RED).decode(),
                                     "parameters": {"num_inference_steps": 0}},), 400, r"\[1, 100\]"),
    ("fractional captions", lambda: ({"inputs": base64.b64encode(RED).decode(),
                                      "parameters": {"num_captions_per_image": 2.5}},), 400, "an integer"),
    ("boolean seed", lambda: ({"inputs": base64.b64encode(RED).decode(), "parameters": {"seed": True}},), 400,
     "parameters.seed"),
    ("negative guidance", lambda: ({"inputs": base64.b64encode(RED).decode(),
                                    "parameters": {"guidance_scale": -1}},), 400, "guidance_scale"),
    ("repeat blocking too long", lambda: ({"inputs": base64.b64encode(RED).decode(),
                                           "parameters": {"no_repeat_ngram_size": 9}},), 400,
     r"parameters.no_repeat_ngram_size must be an integer in \[0, 8\]"),
    ("word bonus out of range", lambda: ({"inputs": base64.b64encode(RED).decode(),
                                          "parameters": {"length_bonus": 6}},), 400,
     r"parameters.length_bonus must be a number in \[-5.0, 5.0\]"),
    ("unknown parameter", lambda: ({"inputs": base64.b64encode(RED).decode(),
                                    "parameters": {"temperature": 1}},), 400, "Unknown parameters"),
]


@pytest.mark.parametrize("name, make, status, message", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_a_clear_error_and_the_next_request_is_served(server, handler, name, make, status, message):
    got_status, body = post(server, *make())
    assert got_status == status, body
    assert set(body) == {"error"} and "Traceback" not in body["error"]
    assert re.search(message, body["error"]), body["error"]
    assert post(server, RED, "image/png") == (200, direct(handler, RED))


def test_concurrent_requests_each_get_their_own_answer(server, handler):
    # Different step counts: the scheduler holds the timesteps of the call in progress, so interleaved calls would
    # sample with each other's schedules.
    settings = [{"seed": seed, "num_inference_steps": 1 + seed % 5, "num_captions_per_image": 4} for seed in range(16)]
    expected = [direct(handler, RED, **parameters) for parameters in settings]
    requests = [{"inputs": base64.b64encode(RED).decode(), "parameters": parameters} for parameters in settings]
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda body: post(server, body), requests))
    assert answers == [(200, captions) for captions in expected]
    assert len({json.dumps(captions) for captions in expected}) > 1  # different settings really differ


def test_health(server):
    with urllib.request.urlopen(server + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
