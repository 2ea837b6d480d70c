"""Readers for the GLUE benchmark's task files, as distributed (tab-separated, UTF-8).

The GLUE data (https://gluebenchmark.com/tasks) is downloaded by the benchmark's own script into
``glue_data/<TASK>/<split>.tsv`` with ``TASK`` one of ``CoLA, SST-2, MRPC, QQP, STS-B, MNLI,
QNLI, RTE, WNLI``. It is *not* reachable from the machines binax is developed on, so nothing here
downloads it: `read_glue` reads the files from a directory you give it (the ``glue_data`` folder
or the task's own folder) and says where it looked when they are missing. The readers are tested
on small files in the official layouts that the tests write.

Column layouts (train and dev files; test files have no label column):

========  =======================================  ===========================================
task      columns read                             labels
========  =======================================  ===========================================
CoLA      no header: source, label, mark, sentence ``0``/``1`` (acceptable)
SST-2     ``sentence``, ``label``                  ``0``/``1`` (positive)
MRPC      ``#1 String``, ``#2 String``, ``Quality``  ``0``/``1`` (paraphrase)
QQP       ``question1``, ``question2``,            ``0``/``1``
          ``is_duplicate``
STS-B     ``sentence1``, ``sentence2``, ``score``  similarity in [0, 5] (float32)
MNLI      ``sentence1``, ``sentence2``,            contradiction 0, entailment 1, neutral 2
          ``gold_label``
QNLI      ``question``, ``sentence``, ``label``    entailment 0, not_entailment 1
RTE       ``sentence1``, ``sentence2``, ``label``  entailment 0, not_entailment 1
WNLI      ``sentence1``, ``sentence2``, ``label``  ``0``/``1``
========  =======================================  ===========================================

Test files (CoLA's and SST-2's too) have a header with ``index`` and the text columns. Fields are
split on tabs with no quoting (``"`` is an ordinary character, as GLUE's sentences contain it).
A row with too few fields (a handful in QQP's train file) is skipped and counted, with a warning;
an unknown label is an error naming the file and line.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from binax.data.errors import DataFormatError, DatasetNotFoundError

__all__ = [
    "GLUE_DATASETS",
    "GLUE_TASKS",
    "GlueExamples",
    "GlueTask",
    "glue_metrics",
    "glue_task",
    "label_names",
    "read_glue",
    "read_glue_tsv",
]


class GlueTask(NamedTuple):
    """How one GLUE task's files are laid out.

    Attributes:
      name: the folder name in ``glue_data`` (``"SST-2"``).
      text_columns: header names of the one or two text columns.
      label_column: header name of the label (train and dev files).
      labels: the label strings in class order, or ``None`` for a regression target (STS-B).
      splits: the file names (without ``.tsv``) of the task's splits.
      header: whether train and dev files have a header row (CoLA's do not).
    """

    name: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    splits: tuple[str, ...] = ("train", "dev", "test")
    header: bool = True

    @property
    def num_classes(self) -> int:
        """Number of classes; 1 for the regression task."""
        return 1 if self.labels is None else len(self.labels)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("CoLA", ("sentence",), "label", _BINARY, header=False),
    "sst2": GlueTask("SST-2", ("sentence",), "label", _BINARY),
    "mrpc": GlueTask("MRPC", ("#1 String", "#2 String"), "Quality", _BINARY),
    "qqp": GlueTask("QQP", ("question1", "question2"), "is_duplicate", _BINARY),
    "stsb": GlueTask("STS-B", ("sentence1", "sentence2"), "score", None),
    "mnli": GlueTask(
        "MNLI",
        ("sentence1", "sentence2"),
        "gold_label",
        ("contradiction", "entailment", "neutral"),
        splits=("train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"),
    ),
    "qnli": GlueTask("QNLI", ("question", "sentence"), "label", _NLI2),
    "rte": GlueTask("RTE", ("sentence1", "sentence2"), "label", _NLI2),
    "wnli": GlueTask("WNLI", ("sentence1", "sentence2"), "label", _BINARY),
}

#: The tasks as ``binax-train --dataset`` names them (``glue/sst2``, ...).
GLUE_DATASETS = tuple(f"glue/{task}" for task in GLUE_TASKS)

# CoLA's train and dev files: source, label, original mark, sentence (no header).
_COLA_COLUMNS = ("source", "label", "mark", "sentence")


class GlueExamples(NamedTuple):
    """The examples of one split.

    Attributes:
      text_a: the first (or only) text of every example.
      text_b: the second text (sentence-pair tasks), or ``None``.
      labels: int64 class indices (float32 scores for STS-B), or ``None`` for a test file.
      skipped: number of rows skipped for having too few fields.
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray | None
    skipped: int = 0


def glue_task(task: str) -> GlueTask:
    """The `GlueTask` of ``task`` (``"sst2"``, ``"SST-2"``, ``"sts-b"``, ... case-insensitive).

    Raises:
      ValueError: unknown task (the message lists them).
    """
    key = str(task).lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(
            f"task: unknown GLUE task {task!r}; valid tasks are {', '.join(GLUE_TASKS)}"
        )
    return GLUE_TASKS[key]


def read_glue_tsv(path: str | os.PathLike, task: str | GlueTask, *, test: bool | None = None):
    """Reads one GLUE ``.tsv`` file of ``task``.

    Args:
      path: the file.
      task: a task name or `GlueTask`.
      test: whether the file is a test file (no labels; always a header). By default, a file
        whose name starts with ``test``.

    Returns:
      `GlueExamples`.

    Raises:
      DataFormatError: a header without the task's columns, or an unknown label (the message
        names the file, the line and the valid labels).
    """
    spec = task if isinstance(task, GlueTask) else glue_task(task)
    path = os.fspath(path)
    if test is None:
        test = os.path.basename(path).startswith("test")
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = [line.rstrip("\r").split("\t") for line in lines]
    if not test and not spec.header:
        columns, first = _COLA_COLUMNS, 0
    else:
        if not rows:
            raise DataFormatError(f"{path}: empty file, expected a header row")
        columns, first = tuple(rows[0]), 1
    wanted = spec.text_columns + (() if test else (spec.label_column,))
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise DataFormatError(
            f"{path}: not a GLUE {spec.name} {'test' if test else 'train/dev'} file: the header "
            f"{list(columns)} lacks the column(s) {missing}"
        )
    # MNLI's dev files have label1..label5 before gold_label: use the last matching column.
    index = [len(columns) - 1 - columns[::-1].index(c) for c in wanted]
    need = max(index) + 1
    texts: list[list[str]] = [[] for _ in spec.text_columns]
    raw_labels, skipped, first_skipped = [], 0, None
    for lineno, row in enumerate(rows[first:], start=first + 1):
        if len(row) < need:
            skipped += 1
            first_skipped = first_skipped or lineno
            continue
        for out, i in zip(texts, index, strict=False):
            out.append(row[i])
        if not test:
            raw_labels.append((lineno, row[index[-1]]))
    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} row(s) with fewer than {need} tab-separated fields "
            f"(first at line {first_skipped})",
            stacklevel=2,
        )
    labels = None if test else _parse_labels(raw_labels, spec, path)
    text_b = texts[1] if len(texts) > 1 else None
    return GlueExamples(texts[0], text_b, labels, skipped)


def _parse_labels(raw, spec, path):
    if spec.labels is None:
        try:
            return np.array([float(v) for _, v in raw], np.float32)
        except ValueError:
            bad = next(n for n, v in raw if not _is_float(v))
            raise DataFormatError(
                f"{path}, line {bad}: the {spec.label_column!r} of {spec.name} must be a number"
            ) from None
    lookup = {name: i for i, name in enumerate(spec.labels)}
    out = np.empty(len(raw), np.int64)
    for k, (lineno, value) in enumerate(raw):
        if value not in lookup:
            raise DataFormatError(
                f"{path}, line {lineno}: unknown {spec.name} label {value!r}; expected one of "
                f"{list(spec.labels)}"
            )
        out[k] = lookup[value]
    return out


def _is_float(value):
    try:
        float(value)
    except ValueError:
        return False
    return True


def read_glue(task: str, split: str, data_dir: str | os.PathLike) -> GlueExamples:
    """Reads ``split`` of GLUE ``task`` from ``data_dir``.

    Looks for ``data_dir/<TASK>/<split>.tsv`` (``data_dir`` the ``glue_data`` folder of GLUE's
    download script) and then ``data_dir/<split>.tsv`` (``data_dir`` the task's own folder).

    Args:
      task: ``"cola"``, ``"sst2"``, ``"mrpc"``, ``"qqp"``, ``"stsb"``, ``"mnli"``, ``"qnli"``,
        ``"rte"`` or ``"wnli"`` (case and dashes ignored).
      split: one of the task's splits: ``"train"``, ``"dev"``, ``"test"``; for MNLI
        ``"dev_matched"``, ``"dev_mismatched"``, ``"test_matched"``, ``"test_mismatched"``.
      data_dir: where the files are.

    Raises:
      ValueError: unknown task or split.
      DatasetNotFoundError: the file is in neither place (the message says where to put it).
      DataFormatError: see `read_glue_tsv`.
    """
    spec = glue_task(task)
    if split not in spec.splits:
        raise ValueError(
            f"split: {spec.name} has the splits {', '.join(spec.splits)}, got {split!r}"
        )
    candidates = [
        os.path.join(os.fspath(data_dir), spec.name, f"{split}.tsv"),
        os.path.join(os.fspath(data_dir), f"{split}.tsv"),
    ]
    for path in candidates:
        if os.path.isfile(path):
            return read_glue_tsv(path, spec, test=split.startswith("test"))
    raise DatasetNotFoundError(
        f"GLUE {spec.name} {split}: no file at {' or '.join(candidates)}. binax does not download "
        "GLUE: get it with the benchmark's download script (https://gluebenchmark.com/tasks) and "
        f"pass its glue_data folder (which holds {spec.name}/{split}.tsv) as the data directory"
    )


def label_names(task: str) -> Sequence[str] | None:
    """The class names of ``task`` in class order (``None`` for STS-B's scores)."""
    return glue_task(task).labels


#: The score GLUE reports besides accuracy, per task (Wang et al., ICLR 2019, Table 1).
GLUE_METRICS = {"cola": ("mcc",), "mrpc": ("f1",), "qqp": ("f1",)}


def glue_metrics(task: str, confusion: np.ndarray) -> dict[str, float]:
    """The scores GLUE reports for ``task`` besides accuracy, from a confusion matrix.

    ``confusion[i, j]`` counts the examples of class ``i`` predicted as ``j`` (class 1 is the
    positive one). MRPC and QQP: ``{"f1": 2 TP / (2 TP + FP + FN)}``; CoLA: ``{"mcc": Matthews
    correlation (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))}``, 0 where a
    factor of the denominator is 0; ``{}`` for the other tasks (accuracy only).
    """
    names = GLUE_METRICS.get(glue_task(task).name.lower().replace("-", ""), ())
    (tn, fp), (fn, tp) = np.asarray(confusion, np.float64)[:2, :2]
    out = {}
    if "f1" in names:
        out["f1"] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0
    if "mcc" in names:
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        out["mcc"] = float((tp * tn - fp * fn) / denominator) if denominator else 0.0
    return out
