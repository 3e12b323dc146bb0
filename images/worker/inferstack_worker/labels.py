"""The class names a model's outputs stand for: a labels file, ImageNet's, or the indices."""

from __future__ import annotations

import logging
from importlib import resources

from inferstack.config import ConfigError, Settings
from inferstack.contract.settings import env_name

from .model_files import read_labels

log = logging.getLogger("inferstack.worker")


def imagenet_labels() -> list[str]:
    text = resources.files("inferstack").joinpath("data/imagenet_labels.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def labels_for(settings: Settings, name: str, classes: int) -> list[str]:
    """The labels of model ``name`` with ``classes`` outputs; ConfigError when the file disagrees."""
    if settings.labels:
        labels = read_labels(settings.labels)
        if classes != len(labels):
            raise ConfigError(f"the labels list has {len(labels)} entries but model {name!r} outputs {classes} classes")
        return labels
    if classes == 1000:
        return imagenet_labels()
    log.warning("no %s for a %d-class model: labels will be class indices", env_name("labels"), classes)
    return [str(i) for i in range(classes)]
