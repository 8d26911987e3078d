"""Accuracy of a checkpoint (PyTorch) or an exported model (ONNX Runtime) on a dataset split.

Both paths preprocess with :func:`cnnserve.common.preprocess.normalize` and return one predicted
class per image, so their predictions can be compared item by item with each other and with
the server's. onnxruntime is imported only when an ONNX model is evaluated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.common.errors import CnnserveError
from cnnserve.common.preprocess import normalize
from cnnserve.training.train.checkpoint import Checkpoint, load_checkpoint, restore_network


class EvaluationError(CnnserveError):
    """A model that cannot be evaluated on the requested data (missing file, shape mismatch)."""


@dataclass(frozen=True)
class OnnxInfo:
    """What evaluating an ONNX model needs besides the graph: normalisation and labels."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Evaluation:
    """Result of :func:`evaluate`; accuracies are fractions in [0, 1]."""

    model: str
    kind: str                              # "checkpoint" or "onnx"
    dataset: str
    split: str
    images: int
    accuracy: float
    class_names: tuple[str, ...]
    per_class_accuracy: tuple[float | None, ...]   # None: class absent from the split
    confusion: np.ndarray                  # int64 [true class, predicted class]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``--json`` output)."""
        return {"model": self.model, "kind": self.kind, "dataset": self.dataset,
                "split": self.split, "images": self.images, "accuracy": self.accuracy,
                "per_class_accuracy": dict(zip(self.class_names, self.per_class_accuracy,
                                               strict=True)),
                "confusion_matrix": self.confusion.tolist(), "seconds": self.seconds}


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 ``[num_classes, num_classes]`` counts; row = true class, column = prediction."""
    flat = labels.astype(np.int64) * num_classes + predictions.astype(np.int64)
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_accuracy(confusion: np.ndarray) -> tuple[float | None, ...]:
    """Recall of each class from a confusion matrix (None where the class has no images)."""
    totals = confusion.sum(axis=1)
    return tuple(None if t == 0 else float(confusion[i, i] / t) for i, t in enumerate(totals))


def evaluate_checkpoint(ckpt: Checkpoint | Path, images_u8: np.ndarray,
                        batch_size: int = 256) -> np.ndarray:
    """Predicted class (int64 ``[N]``) of a checkpoint for uint8 ``[N, C, H, W]`` images."""
    import torch

    from cnnserve.training.train.data import predict_logits, to_tensor

    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    _check_shape(images_u8, ckpt.input_shape, "checkpoint")
    model = restore_network(ckpt)
    with torch.no_grad():
        logits = predict_logits(model, to_tensor(images_u8, ckpt.mean, ckpt.std), batch_size)
    return logits.argmax(dim=1).numpy().astype(np.int64)


def onnx_info(path: Path) -> OnnxInfo:
    """Normalisation and labels of ``model.onnx``: from the config.json beside it if present,
    else from its metadata_props ``cnnserve.normalization`` / ``cnnserve.labels``."""
    from cnnserve.common.repository import CONFIG_FILE, VersionConfig

    config_path = path.parent / CONFIG_FILE
    if config_path.is_file():
        config = VersionConfig.load(config_path)
        if config.normalization is not None:
            return OnnxInfo(config.normalization.mean, config.normalization.std, config.labels)
    meta = _session(path).get_modelmeta().custom_metadata_map
    try:
        norm = json.loads(meta["cnnserve.normalization"])
        labels = json.loads(meta.get("cnnserve.labels", "[]"))
        return OnnxInfo(tuple(float(v) for v in norm["mean"]),
                        tuple(float(v) for v in norm["std"]), tuple(str(v) for v in labels))
    except (KeyError, TypeError, ValueError) as exc:
        raise EvaluationError(f"{path}: no normalisation found (no {CONFIG_FILE} beside it and "
                              f"no valid 'cnnserve.normalization' metadata); export it with "
                              f"`cnnserve export`") from exc


def _session(path: Path) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise EvaluationError(f"ONNX model not found: {path}")
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise EvaluationError(f"{path} is not a loadable ONNX model: {exc}") from exc


def evaluate_onnx(path: Path, images_u8: np.ndarray, batch_size: int = 256, *,
                  mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> np.ndarray:
    """Predicted class (int64 ``[N]``) of an ONNX model for uint8 ``[N, C, H, W]`` images.

    ``path`` is a model.onnx file or the version folder holding it. Normalisation comes from
    ``mean``/``std`` if given, else from :func:`onnx_info`. The graph's first input gets the
    normalised batch (cast to float16 if the graph wants it), or the pixels themselves when it
    takes UINT8; the first output's argmax is the prediction.
    """
    path = _onnx_path(path)
    if mean is None or std is None:
        info = onnx_info(path)
        mean, std = info.mean, info.std
    session = _session(path)
    inp = session.get_inputs()[0]
    _check_shape(images_u8, tuple(inp.shape[1:]), "ONNX model")
    out_name = session.get_outputs()[0].name
    if inp.type == "tensor(uint8)":
        def feed(x: np.ndarray) -> np.ndarray:
            return x  # the graph normalises the pixels itself (cnnserve export's default)
    else:
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32

        def feed(x: np.ndarray) -> np.ndarray:
            return normalize(x, mean, std).astype(dtype)
    preds = [np.argmax(session.run([out_name], {inp.name: feed(images_u8[i:i + batch_size])})[0],
                       axis=1) for i in range(0, len(images_u8), batch_size)]
    return np.concatenate(preds).astype(np.int64) if preds else np.empty(0, np.int64)


def _onnx_path(path: Path) -> Path:
    path = Path(path)
    return path / "model.onnx" if path.is_dir() else path


def _check_shape(images: np.ndarray, expected: tuple[Any, ...], what: str) -> None:
    got = tuple(images.shape[1:])
    if len(expected) != 3 or any(isinstance(e, int) and e != g
                                 for e, g in zip(expected, got, strict=False)):
        raise EvaluationError(f"the {what} expects images of shape "
                              f"{'x'.join(map(str, expected))} (C x H x W) but the dataset's "
                              f"are {'x'.join(map(str, got))}")


def is_onnx(path: Path) -> bool:
    """True for a .onnx file or a folder holding model.onnx (a repository version)."""
    path = Path(path)
    return path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file())


def evaluate(path: Path, dataset: str | None = None, split: str = "test", *,
             batch_size: int = 256, seed: int = 0, download: bool = False) -> Evaluation:
    """Evaluate a checkpoint or ONNX model on ``split`` of ``dataset``.

    ``dataset`` defaults to the one the model was trained on. Raises CnnserveError subclasses
    (checkpoint, dataset, evaluation) with actionable messages.
    """
    from cnnserve.common.data.datasets import load_split

    path = Path(path)
    onnx = is_onnx(path)
    if onnx:
        info = onnx_info(_onnx_path(path))
        labels, default_ds = info.labels, _onnx_dataset(_onnx_path(path))
    else:
        ckpt = load_checkpoint(path)
        labels, default_ds = ckpt.class_names, ckpt.dataset
    name = dataset or default_ds
    if not name:
        raise EvaluationError(f"{path} does not record its dataset; pass --dataset")
    shape: tuple[Any, ...] = ()
    if dataset:  # a folder given by hand is read at the model's input size
        shape = (tuple(_session(_onnx_path(path)).get_inputs()[0].shape[1:]) if onnx
                 else tuple(ckpt.input_shape))
        name = _sized(name, shape)
    if default_ds and dataset and dataset != default_ds and labels:
        # Another dataset with other classes would score chance (9% for Fashion-MNIST on
        # MNIST) and look like a broken model: refuse, naming both class lists.
        data = _split_of_matching(path, labels, shape, default_ds, name, split, seed, download)
    else:
        data = load_split(name, split, seed=seed, download=download)
    started = time.monotonic()
    preds = (evaluate_onnx(path, data.images, batch_size) if onnx
             else evaluate_checkpoint(ckpt, data.images, batch_size))
    seconds = time.monotonic() - started
    num_classes = max(len(labels), int(data.labels.max(initial=0)) + 1,
                      int(preds.max(initial=0)) + 1)
    names = tuple(labels) + tuple(str(i) for i in range(len(labels), num_classes))
    cm = confusion_matrix(data.labels, preds, num_classes)
    accuracy = float((preds == data.labels).mean()) if len(preds) else 0.0
    return Evaluation(str(path), "onnx" if onnx else "checkpoint", name, split, len(preds),
                      accuracy, names, per_class_accuracy(cm), cm, seconds)


def _split_of_matching(path: Path, labels: Sequence[str], shape: tuple[Any, ...],
                       trained_on: str, name: str, split: str, seed: int,
                       download: bool) -> Any:
    """``split`` of dataset ``name``; raises UsageError when its classes are not ``labels``
    (images of another ``shape`` are left to the shape check, whose message is plainer)."""
    from cnnserve.common.data.datasets import SPLITS, DatasetError, load_dataset
    from cnnserve.common.errors import UsageError

    if split not in SPLITS:
        raise DatasetError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    ds = load_dataset(name, seed=seed, download=download)
    same_shape = tuple(ds.test.images.shape[1:]) == shape
    if same_shape and tuple(ds.class_names) != tuple(labels):
        raise UsageError(
            f"{path} was trained on {trained_on} (classes {_short(labels)}) but {name} has "
            f"classes {_short(ds.class_names)}: its accuracy there would be meaningless; "
            f"evaluate on --dataset {trained_on} or a dataset with the same classes")
    return {"train": ds.train, "val": ds.val, "test": ds.test}[split]


def _short(names: Sequence[str]) -> str:
    shown = ", ".join(names[:4])
    return f"{shown}, ... ({len(names)})" if len(names) > 4 else shown


def _sized(name: str, shape: tuple[Any, ...]) -> str:
    """``name`` read at image ``shape`` (C, H, W) when it is a dataset of chosen shape."""
    from cnnserve.common.data import registry

    entry, _ = registry.resolve(name)
    if entry.canonical is None or not all(isinstance(d, int) for d in shape):
        return name
    return registry.canonical_name(name, (int(shape[1]), int(shape[2])), int(shape[0]))


def _onnx_dataset(path: Path) -> str:
    from cnnserve.common.repository import CONFIG_FILE, VersionConfig

    config_path = path.parent / CONFIG_FILE
    if config_path.is_file():
        return VersionConfig.load(config_path).dataset
    return str(_session(path).get_modelmeta().custom_metadata_map.get("cnnserve.dataset", ""))


def format_table(ev: Evaluation) -> str:
    """A plain-text table: overall accuracy, then accuracy and count per class."""
    width = max([len("class"), *(len(n) for n in ev.class_names)])
    totals = ev.confusion.sum(axis=1)
    lines = [f"{ev.kind} {ev.model} on {ev.dataset} ({ev.split}, {ev.images} images): "
             f"accuracy {ev.accuracy * 100:.2f}%", "",
             f"{'class':<{width}}  {'images':>6}  {'accuracy':>8}",
             f"{'-' * width}  {'-' * 6}  {'-' * 8}"]
    for name, total, acc in zip(ev.class_names, totals, ev.per_class_accuracy, strict=True):
        shown = "-" if acc is None else f"{acc * 100:.2f}%"
        lines.append(f"{name:<{width}}  {int(total):>6}  {shown:>8}")
    return "\n".join(lines)
