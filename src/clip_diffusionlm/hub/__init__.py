"""Publishing to the Hub: repository files, the model card, the upload, the Inference Endpoints handler and a local
server around it. Depends on the pipelines; nothing in the pipelines depends on it."""

from ..pipelines.captioning_utils import REPOSITORY_FILE_WRITERS
from .model_card import build_model_card, save_model_card, write_examples, write_training_record
from .repository import HubRepositoryError, check_hub_repo, push_folder_to_hub, write_published_files

if write_published_files not in REPOSITORY_FILE_WRITERS:
    REPOSITORY_FILE_WRITERS.append(write_published_files)

__all__ = [
    "HubRepositoryError",
    "build_model_card",
    "check_hub_repo",
    "push_folder_to_hub",
    "write_published_files",
    "save_model_card",
    "write_examples",
    "write_training_record",
]
