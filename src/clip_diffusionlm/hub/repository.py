"""
Publishing a saved pipeline: the files a repository holds besides what `save_pretrained` writes (the model card, the
Inference Endpoints handler and its requirements), the start-up check of a repository, and the upload.

Training's `--push_to_hub` and `clip-diffusionlm push` end in [`push_folder_to_hub`], which uploads what a local save
holds; `pipe.push_to_hub` uploads a fresh save, to which [`write_published_files`] adds the same files. A pushed repository needs none of this package: its code
is the pipeline's and the denoiser's own modules (see `pipelines/captioning_utils.write_pipeline_code`) and
`handler.py` is [`clip_diffusionlm.hub.handler`] verbatim.
"""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from packaging.requirements import Requirement

from ..pipelines.captioning_utils import upload_folder_to_hub
from . import handler
from .model_card import save_model_card

HANDLER_FILE = "handler.py"
REQUIREMENTS_FILE = "requirements.txt"
# What the repository's code imports: the requirements of an Endpoint or a Space that serves it, with the lower
# bounds this package itself requires.
RUNTIME_DISTRIBUTIONS = ("torch", "transformers", "diffusers", "huggingface_hub", "safetensors", "pillow", "numpy")

# What a repository may hold: weights as safetensors only, configs, tokenizer files, code, the card and its example
# images. Anything else in an output folder (checkpoints, pickles, logs, feature caches) stays local.
PUBLISHED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".py", ".model", ".png", ".jpg", ".jpeg")
LOCAL_ONLY_FOLDERS = ("logs", "feature_cache", "evaluation")
LOCAL_ONLY_PREFIXES = ("checkpoint-", ".tmp-checkpoint-", ".")
# training_config.json holds this machine's paths; its portable part is in the training record.
LOCAL_ONLY_FILES = ("training_config.json",)


class HubRepositoryError(ValueError):
    """A repository id, token or permission that makes publishing impossible."""


def runtime_requirements() -> list[str]:
    """The requirement lines of a pushed repository: [`RUNTIME_DISTRIBUTIONS`] with this package's lower bounds."""
    bounds = {}
    for line in metadata.requires("clip-diffusionlm") or []:
        requirement = Requirement(line)
        if requirement.marker is None:
            bounds[requirement.name.lower().replace("-", "_")] = str(requirement.specifier)
    return [f"{name}{bounds.get(name, '')}" for name in RUNTIME_DISTRIBUTIONS]


def write_repository_files(folder: str | os.PathLike) -> None:
    """Writes the Inference Endpoints `handler.py` (this package's handler module, verbatim) and the
    `requirements.txt` an Endpoint or Space installs to run the repository's code."""
    folder = Path(folder)
    shutil.copyfile(handler.__file__, folder / HANDLER_FILE)
    (folder / REQUIREMENTS_FILE).write_text("\n".join(runtime_requirements()) + "\n", encoding="utf-8")


def check_hub_repo(
    repo_id: str, token: str | None = None, private: bool | None = None, api: HfApi | None = None
) -> str:
    """
    Makes sure `repo_id` can be published to, before anything expensive runs: the id is valid, the token belongs to
    someone, and the model repository exists (it is created, private if asked, when it does not).

    Args:
        repo_id (`str`):
            `"user/name"`, `"organisation/name"`, or a bare `"name"` in the token owner's namespace.
        token (`str`, *optional*):
            A Hub token with write access; defaults to the saved login or `HF_TOKEN`.
        private (`bool`, *optional*):
            Visibility of a repository that has to be created.

    Returns:
        `str`: The full repository id, `"owner/name"`.

    Raises:
        [`HubRepositoryError`]: naming the repository and what to fix.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubRepositoryError(f"{repo_id!r} is not a valid Hub repository id ('user/name'): {error}") from None
    api = api or HfApi(token=token)
    try:
        user = api.whoami()
    except (HfHubHTTPError, OSError) as error:
        raise HubRepositoryError(
            f"Cannot publish to {repo_id!r}: the Hub did not accept the token ({error}). Log in with `hf auth login` "
            "or set HF_TOKEN to a token with write access."
        ) from None
    try:
        return api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    except (HfHubHTTPError, OSError) as error:
        raise HubRepositoryError(
            f"Cannot create or use the Hub repository {repo_id!r} as {user.get('name', 'this user')!r}: {error}"
        ) from None


def publishable_files(folder: str | os.PathLike) -> list[str]:
    """The files of a saved pipeline folder that belong in its repository, as sorted POSIX paths."""
    folder = Path(folder)
    files = []
    for path in folder.rglob("*"):
        relative = PurePosixPath(path.relative_to(folder).as_posix())
        top = relative.parts[0]
        if (
            not path.is_file()
            or top in LOCAL_ONLY_FOLDERS
            or top.startswith(LOCAL_ONLY_PREFIXES)
            or str(relative) in LOCAL_ONLY_FILES
            or relative.suffix.lower() not in PUBLISHED_SUFFIXES
        ):
            continue
        files.append(str(relative))
    return sorted(files)


def write_published_files(folder: str | os.PathLike, repo_id: str) -> None:
    """What a repository of a diffusion pipeline holds besides the save: handler, requirements and the model card for
    `repo_id`. Registered with the pipelines, so `pipe.push_to_hub` publishes them too."""
    if Path(folder, "denoiser", "config.json").is_file():
        write_repository_files(folder)
        save_model_card(folder, repo_id)


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, **upload_options):
    """
    Uploads a saved pipeline folder to the Hub as one commit: the start-up check of [`check_hub_repo`] first, then the
    card regenerated for `repo_id`, the Endpoint handler and requirements written into `folder` (so the local folder
    and the repository agree), then every file of [`publishable_files`].

    Args:
        folder (`str` or `os.PathLike`):
            A folder written by `CLIPDiffusionCaptionPipeline.save_pretrained` (or by training).
        repo_id (`str`):
            The model repository, created when missing.
        upload_options:
            `token` (used for every call; defaults to the saved login or `HF_TOKEN`), `private` (visibility of a
            repository that has to be created), `revision` (a branch, created from `main` when missing),
            `commit_message` and `create_pr`, as `upload_folder_to_hub` takes them.

    Returns:
        `huggingface_hub.CommitInfo`: The commit, with its URL.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a saved pipeline: it has no model_index.json.")
    repo_id = check_hub_repo(repo_id, token=upload_options.get("token"), private=upload_options.get("private"))
    upload_options.setdefault("commit_message", "Upload CLIP-DiffusionLM pipeline")
    # The upload runs the registered writers, [`write_published_files`] among them, before it sends the files.
    return upload_folder_to_hub(folder, repo_id, files=publishable_files, **upload_options)



