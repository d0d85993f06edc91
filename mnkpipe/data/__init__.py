"""Data: Omniglot and class-folder image datasets, Lake's one-shot runs, preprocessing and few-shot episode sampling."""

from .dataset import DataError, DataNotFoundError, ImageDataset, concat
from .episodes import EpisodeSet, TaskSet, sample_episodes, sample_tasks
from .folders import load_image_folder
from .lake import load_lake_runs
from .omniglot import (
    OMNIGLOT_BASE_URL,
    OMNIGLOT_FILES,
    SPLITS,
    dataset_info,
    default_data_root,
    download_omniglot,
    load_omniglot,
    omniglot_alphabets,
    omniglot_info,
    resolve_data_root,
)
from .preprocess import fit_standardiser, standardise_and_pad

__all__ = [
    "DataError",
    "DataNotFoundError",
    "ImageDataset",
    "concat",
    "EpisodeSet",
    "TaskSet",
    "sample_episodes",
    "sample_tasks",
    "load_image_folder",
    "load_lake_runs",
    "OMNIGLOT_BASE_URL",
    "OMNIGLOT_FILES",
    "SPLITS",
    "dataset_info",
    "default_data_root",
    "download_omniglot",
    "load_omniglot",
    "omniglot_alphabets",
    "omniglot_info",
    "resolve_data_root",
    "fit_standardiser",
    "standardise_and_pad",
]
