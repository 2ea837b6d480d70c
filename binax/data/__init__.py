"""Datasets for binax: official-format readers, checked downloads, an offline default.

The entry point is :func:`load`; :func:`batches` and :func:`random_crop_flip` give a
deterministic, resumable, shardable input pipeline. See ``datasets.py`` for where files
are looked for, and ``pipeline.py`` for the determinism guarantees. :func:`read_glue` reads the
GLUE task files (tokenize them with ``binax.data.text``, which needs the ``binax[text]`` extra).
"""

from binax.data.cifar import read_cifar10, read_cifar100, read_tar_members
from binax.data.datasets import (
    CHANNEL_STATS,
    DATASET_NAMES,
    DOWNLOADABLE,
    FASHION_MNIST_SYSTEM_DIR,
    Dataset,
    channel_stats,
    load,
    normalize,
    stratified_split,
)
from binax.data.errors import DataFormatError, DatasetNotFoundError
from binax.data.fetch import (
    DATA_DIR_ENV,
    DownloadError,
    Resource,
    download,
    resolve_data_dir,
)
from binax.data.glue import (
    GLUE_DATASETS,
    GLUE_TASKS,
    GlueExamples,
    GlueTask,
    glue_metrics,
    glue_task,
    read_glue,
    read_glue_tsv,
)
from binax.data.idx import parse_idx, read_idx, read_idx_images_labels
from binax.data.pipeline import (
    Batch,
    batches,
    epoch_permutation,
    example_random_bits,
    num_batches,
    random_crop_flip,
    shard_bounds,
)

__all__ = [
    "CHANNEL_STATS",
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "DOWNLOADABLE",
    "FASHION_MNIST_SYSTEM_DIR",
    "GLUE_DATASETS",
    "GLUE_TASKS",
    "GlueExamples",
    "GlueTask",
    "Batch",
    "DataFormatError",
    "Dataset",
    "DatasetNotFoundError",
    "DownloadError",
    "Resource",
    "batches",
    "channel_stats",
    "download",
    "epoch_permutation",
    "example_random_bits",
    "glue_metrics",
    "glue_task",
    "load",
    "normalize",
    "num_batches",
    "parse_idx",
    "random_crop_flip",
    "read_cifar10",
    "read_cifar100",
    "read_glue",
    "read_glue_tsv",
    "read_idx",
    "read_idx_images_labels",
    "read_tar_members",
    "resolve_data_dir",
    "shard_bounds",
    "stratified_split",
]
