"""Publishing: the files each entry point uploads, the model card, the start-up repository check, remote loading.

The Hub is replaced at the `HfApi` methods the publishing path calls (whoami, create_repo, create_branch,
create_commit); everything up to them (saving, filtering, the card, the commit operations) runs for real.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import PIL.Image
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.errors import HfHubHTTPError

from clip_diffusionlm import CLIPDiffusionCaptionPipeline
from clip_diffusionlm.cli import main
from clip_diffusionlm.hub import INSTALL_COMMAND, HubRepositoryError, check_hub_repo, describe_source

USER = "someone"
REVISION = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """Records what reaches the Hub API; a token "bad" is refused like an expired one."""

    def __init__(self):
        self.repos: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict] = []

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def whoami(api, token=None):
            if api.token == "bad":
                request = httpx2.Request("GET", "https://huggingface.co/api/whoami-v2")
                raise HfHubHTTPError("401 Unauthorized: invalid token", response=httpx2.Response(401, request=request))
            return {"name": USER}

        def create_repo(api, repo_id, *, private=None, exist_ok=False, **kwargs):
            repo_id = repo_id if "/" in repo_id else f"{USER}/{repo_id}"
            hub.repos.append({"repo_id": repo_id, "private": private, "exist_ok": exist_ok, "token": api.token})
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kwargs):
            hub.branches.append((repo_id, branch))

        def create_commit(api, repo_id, operations, *, commit_message, revision=None, create_pr=None, **kwargs):
            files = {}
            for operation in operations:
                with open(operation.path_or_fileobj, "rb") as file:
                    files[operation.path_in_repo] = file.read()
            hub.commits.append(
                {"repo_id": repo_id, "files": files, "message": commit_message, "revision": revision,
                 "create_pr": create_pr, "token": api.token}
            )
            return CommitInfo(f"https://huggingface.co/{repo_id}/commit/{REVISION}", commit_message, "", REVISION)

        for name, method in [("whoami", whoami), ("create_repo", create_repo), ("create_branch", create_branch),
                             ("create_commit", create_commit)]:
            monkeypatch.setattr(HfApi, name, method)
        return self

    @property
    def pushed(self) -> dict[str, bytes]:
        assert len(self.commits) == 1, f"expected one commit, got {len(self.commits)}"
        return self.commits[0]["files"]


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    return FakeHub().install(monkeypatch)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()
    }


def into_hub_cache(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Lays `files` out as huggingface_hub's cache holds a downloaded repository."""
    repo_cache = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    for name, content in files.items():
        path = repo_cache / "snapshots" / REVISION / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (repo_cache / "refs").mkdir(parents=True, exist_ok=True)
    (repo_cache / "refs" / "main").write_text(REVISION)


def run_offline(script: str, hf_home: Path, without_package: bool = False) -> str:
    """Runs `script` in a fresh interpreter with the Hub switched off; optionally with clip_diffusionlm unimportable."""
    if without_package:
        script = "import sys\nsys.modules['clip_diffusionlm'] = None\n" + script
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def _caption(pipe, image) -> list[str]:
    pipe.set_progress_bar_config(disable=True)
    return pipe(image, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).captions


# --- the four entry points upload what a local save holds -------------------------------------------------------


def test_pipe_push_to_hub_uploads_a_local_save_with_the_options(pipeline, tmp_path, hub):
    pipeline.save_pretrained(tmp_path / "local")
    local = folder_files(tmp_path / "local")

    commit = pipeline.push_to_hub(
        f"{USER}/tiny", private=True, token="secret", revision="dev", commit_message="First upload"
    )

    assert sorted(hub.pushed) == sorted(local)
    assert all(hub.pushed[name] == local[name] for name in local if name.endswith(".safetensors"))
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".ckpt")) for name in hub.pushed)
    assert hub.repos == [{"repo_id": f"{USER}/tiny", "private": True, "exist_ok": True, "token": "secret"}]
    assert hub.branches == [(f"{USER}/tiny", "dev")]
    assert hub.commits[0]["message"] == "First upload" and hub.commits[0]["revision"] == "dev"
    assert hub.commits[0]["token"] == "secret"
    assert f'from_pretrained("{USER}/tiny")' in hub.pushed["README.md"].decode()
    assert commit.oid == REVISION


def test_save_pretrained_with_push_to_hub_uploads_the_saved_folder(pipeline, tmp_path, hub):
    pipeline.save_pretrained(tmp_path / "tiny", push_to_hub=True, repo_id=f"{USER}/tiny-save", commit_message="m")

    assert hub.pushed == folder_files(tmp_path / "tiny")  # names and bytes: the local copy is what the Hub holds
    assert {"handler.py", "requirements.txt", "pipeline_clip_diffusion_caption.py", "README.md"} <= set(hub.pushed)
    index = json.loads(hub.pushed["model_index.json"])
    assert index["_class_name"] == ["pipeline_clip_diffusion_caption", "CLIPDiffusionCaptionPipeline"]
    assert ModelCard(hub.pushed["README.md"].decode()).data.model_name == f"{USER}/tiny-save"


def test_save_pretrained_push_to_hub_defaults_to_the_folder_name_in_your_namespace(pipeline, tmp_path, hub):
    pipeline.save_pretrained(tmp_path / "captioner", push_to_hub=True)
    assert hub.commits[0]["repo_id"] == f"{USER}/captioner"


@pytest.fixture
def training_output(pipeline_from_assets, tmp_path) -> Path:
    """A copy of a training output folder, with the leftovers a run can leave that must never be uploaded."""
    folder = tmp_path / "run"
    shutil.copytree(pipeline_from_assets, folder)
    (folder / "denoiser" / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "logs").mkdir(exist_ok=True)
    (folder / "logs" / "events.txt").write_text("log")
    (folder / "feature_cache").mkdir(exist_ok=True)
    (folder / "feature_cache" / "index.json").write_text("{}")
    (folder / "checkpoint-2").mkdir(exist_ok=True)
    (folder / "checkpoint-2" / "model.safetensors").write_bytes(b"weights of an older step")
    (folder / "loss_history.jsonl").write_text("{}\n")
    return folder


def test_cli_push_uploads_the_saved_pipeline_card_and_record_only(training_output, tmp_path, hub, capsys):
    resaved = tmp_path / "resaved"
    CLIPDiffusionCaptionPipeline.from_pretrained(training_output).save_pretrained(resaved)
    examples = {f"examples/{name}" for name in os.listdir(training_output / "examples")}
    expected = set(folder_files(resaved)) | examples | {"training_results.json"}

    code = main(["push", str(training_output), f"{USER}/tiny-run", "--private", "--revision", "v1",
                 "--commit-message", "Run 1", "--token", "secret"])

    assert code == 0
    assert set(hub.pushed) == expected
    assert hub.repos[0]["private"] is True and hub.branches == [(f"{USER}/tiny-run", "v1")]
    assert hub.commits[0]["message"] == "Run 1" and hub.commits[0]["token"] == "secret"
    assert f"{USER}/tiny-run/commit/" in capsys.readouterr().out


def test_cli_push_refuses_a_folder_that_is_no_pipeline(tmp_path, hub, capsys):
    assert main(["push", str(tmp_path), f"{USER}/x"]) == 2
    assert "model_index.json" in capsys.readouterr().err
    assert hub.commits == []


# --- the start-up check -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", ["not a repo id", "a/b/c", "x" * 200 + "/y"])
def test_check_hub_repo_names_an_invalid_repo_id(repo_id, hub):
    with pytest.raises(HubRepositoryError, match="not a valid Hub repository id"):
        check_hub_repo(repo_id)
    assert hub.repos == []


def test_check_hub_repo_says_how_to_fix_a_refused_token(hub):
    with pytest.raises(HubRepositoryError, match=r"did not accept the token.*hf auth login"):
        check_hub_repo(f"{USER}/x", token="bad")
    assert hub.repos == []
    assert check_hub_repo("x", token="good") == f"{USER}/x"


# --- the model card ---------------------------------------------------------------------------------------------


@pytest.fixture
def pushed_run(training_output, hub) -> tuple[Path, dict[str, bytes]]:
    assert main(["push", str(training_output), f"{USER}/tiny-run"]) == 0
    return training_output, hub.pushed


def test_card_metadata_model_index_and_widget(pushed_run, training_assets):
    folder, pushed = pushed_run
    text = pushed["README.md"].decode()
    card = ModelCard(text)  # parses the YAML front matter, validating the model-index
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "image-to-text"
    assert card.data.model_name == f"{USER}/tiny-run"
    record = json.loads(pushed["training_results.json"])
    assert {result.metric_name for result in card.data.eval_results} >= {"BLEU-4", "CIDEr"}
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["CIDEr"] == round(
        record["metrics"]["CIDEr"], 4
    )
    # Local checkpoints are not Hub ids: no base_model, readable names only, no path of this machine anywhere.
    assert "base_model" not in data
    assert data["datasets"] == ["shapes world (synthetic images generated by clip-diffusionlm)"]
    for local_path in (str(training_assets["world"]), str(training_assets["clip"]), str(training_assets["backbone"])):
        assert local_path not in text
    # The widget shows the repository's own example images with the captions the model wrote for them.
    examples = json.loads(pushed["examples/examples.json"])["examples"]
    assert [w["src"] for w in data["widget"]] == [
        f"https://huggingface.co/{USER}/tiny-run/resolve/main/{e['file']}" for e in examples
    ]
    assert all(example["file"] in pushed for example in examples)
    pipe = CLIPDiffusionCaptionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    images = [PIL.Image.open(folder / example["file"]).convert("RGB") for example in examples]
    steps = json.loads(pushed["examples/examples.json"])["num_inference_steps"]
    regenerated = pipe(images, num_inference_steps=steps, generator=torch.Generator().manual_seed(0)).captions
    assert [w["output"]["text"] for w in data["widget"]] == regenerated
    # The install line comes first, then the snippet; training time, configuration, limitations and citation follow.
    assert text.index(INSTALL_COMMAND) < text.index("```python")
    assert f"{record['global_step']} optimizer steps" in text and re.search(r"in \d+ min \d+ s", text)
    assert "| `learning_rate` | 0.001 |" in text
    assert "## Limitations" in text and "arXiv:2210.04559" in text


def test_card_command_regenerates_the_card_with_new_examples(training_output, tmp_path):
    image = tmp_path / "red.png"
    PIL.Image.new("RGB", (64, 48), (220, 20, 20)).save(image)
    (training_output / "README.md").unlink()

    assert main(["card", str(training_output), "--repo-id", f"{USER}/again", "--example-images", str(image),
                 "--output", str(tmp_path / "card.md")]) == 0

    card = ModelCard.load(training_output / "README.md")
    assert card.data.model_name == f"{USER}/again" and len(card.data.widget) == 1
    assert (tmp_path / "card.md").read_text() == (training_output / "README.md").read_text()
    # Without --repo-id the card keeps the repository it names.
    assert main(["card", str(training_output)]) == 0
    assert ModelCard.load(training_output / "README.md").data.model_name == f"{USER}/again"


def test_describe_source_never_returns_a_local_path(training_assets, tmp_path):
    assert describe_source("openai/clip-vit-base-patch32", "model") == {
        "hub_id": "openai/clip-vit-base-patch32", "name": "openai/clip-vit-base-patch32"
    }
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps({"dataset": "flickr8k", "images": []}))
    assert describe_source(str(karpathy), "dataset") == {"hub_id": None, "name": "flickr8k (Karpathy split)"}
    local = describe_source(str(training_assets["clip"]), "model")
    assert local["hub_id"] is None and str(tmp_path.parent) not in local["name"]


# --- remote loading from the Hugging Face cache, offline, in fresh processes -------------------------------------


@pytest.fixture
def cached_repo(pipeline, tmp_path, hub) -> tuple[Path, str]:
    repo_id = f"{USER}/tiny-remote"
    pipeline.push_to_hub(repo_id)
    into_hub_cache(tmp_path / "hf", repo_id, hub.pushed)
    return tmp_path / "hf", repo_id


IMAGE = "PIL.Image.new('RGB', (40, 30), (255, 0, 0))"


def test_card_snippet_and_diffusers_loader_work_from_the_cache(cached_repo, pipeline):
    hf_home, repo_id = cached_repo
    card = (hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots" / REVISION / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    assert f'from_pretrained("{repo_id}")' in snippet
    captions = json.loads(run_offline(snippet + "\nimport json\nprint(json.dumps(captions))", hf_home))
    pipeline.set_progress_bar_config(disable=True)
    white = PIL.Image.new("RGB", (96, 96), "white")
    assert captions == pipeline(white, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).captions

    script = textwrap.dedent(
        f"""
        import json, PIL.Image, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        print(json.dumps([type(pipe).__name__, pipe({IMAGE}, num_inference_steps=3,
                          generator=torch.Generator().manual_seed(0)).captions]))
        """
    )
    name, generic = json.loads(run_offline(script, hf_home))
    assert name == "CLIPDiffusionCaptionPipeline" and generic == _caption(pipeline, eval(IMAGE))


def test_without_the_package_the_denoiser_loads_as_remote_code_and_the_pipeline_says_what_to_install(
    cached_repo, pipeline
):
    hf_home, repo_id = cached_repo
    script = textwrap.dedent(
        f"""
        import json, torch
        from huggingface_hub import snapshot_download
        from transformers import AutoModel
        denoiser = AutoModel.from_pretrained(snapshot_download("{repo_id}") + "/denoiser", trust_remote_code=True)
        torch.manual_seed(0)
        noisy, image = torch.randn(1, 8, 32), torch.randn(1, 16)
        print(json.dumps([type(denoiser).__module__,
                          denoiser(noisy, torch.tensor([10]), image).prediction.flatten()[:8].tolist()]))
        """
    )
    module, values = json.loads(run_offline(script, hf_home, without_package=True))
    assert not module.startswith("clip_diffusionlm")  # the repository's own modeling code ran
    torch.manual_seed(0)
    noisy, image = torch.randn(1, 8, 32), torch.randn(1, 16)
    with torch.no_grad():
        expected = pipeline.denoiser(noisy, torch.tensor([10]), image).prediction.flatten()[:8]
    assert torch.allclose(torch.tensor(values), expected, atol=1e-5)

    script = textwrap.dedent(
        f"""
        from diffusers import DiffusionPipeline
        try:
            DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)
        except ImportError as error:
            print(error)
        """
    )
    assert INSTALL_COMMAND in run_offline(script, hf_home, without_package=True)


# --- training: the repository is checked before any compute, the output folder is pushed at the end ----------------


def test_training_push_to_hub_uploads_the_output_folder(training_assets, tmp_path, hub):
    from conftest import tiny_training_config

    from clip_diffusionlm.training import train

    output = train(tiny_training_config(training_assets, tmp_path / "out", max_steps=2, push_to_hub=True,
                                        hub_model_id=f"{USER}/trained"))

    resaved = tmp_path / "resaved"
    CLIPDiffusionCaptionPipeline.from_pretrained(output).save_pretrained(resaved)
    examples = {f"examples/{name}" for name in os.listdir(output / "examples")}
    assert set(hub.pushed) == set(folder_files(resaved)) | examples | {"training_results.json"}
    assert hub.pushed["README.md"] == (output / "README.md").read_bytes()
    assert ModelCard.load(output / "README.md").data.model_name == f"{USER}/trained"
    assert hub.commits[0]["message"] == "Training run: 2 steps"


def test_training_refuses_an_invalid_repo_id_before_any_compute(training_assets, tmp_path, hub):
    from conftest import tiny_training_config

    from clip_diffusionlm.training import train

    config = tiny_training_config(training_assets, tmp_path / "out", push_to_hub=True, hub_model_id="me/not valid")
    with pytest.raises(HubRepositoryError, match="'me/not valid' is not a valid Hub repository id"):
        train(config)
    assert not (tmp_path / "out").exists()  # no output folder, feature cache or step was made
    assert hub.repos == [] and hub.commits == []
