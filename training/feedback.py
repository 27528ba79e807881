"""Labelled feedback back into training: the store's digit-labelled images (service/feedback/store.py), how often
each is seen per epoch, and the provenance that names the rows a model was trained on."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


class FeedbackError(Exception):
    """The feedback store is missing, unreadable, or holds no labelled images; the message says which."""


@dataclass(frozen=True)
class FeedbackSet:
    images: torch.Tensor  # uint8 [N, 28, 28], the images the served model saw
    labels: torch.Tensor  # int64 [N]
    provenance: dict  # store (no password), rows, first and last id, sha256, weight, copies per epoch


def store_name(where: str) -> str:
    """The store's address as a checkpoint may record it: a PostgreSQL URL without its password."""
    from service.feedback.store import redacted

    return redacted(where)


def load_feedback(where: str, weight: float) -> FeedbackSet:
    """The digit-labelled feedback images of the store at ``where`` (a SQLite path or ``postgresql://...``)."""
    from service.feedback.store import StoreError, open_store

    name = store_name(where)
    if not where.startswith(("postgresql://", "postgres://")):
        path = Path(where.removeprefix("sqlite://") if where.startswith("sqlite:///") else where)
        if not path.is_file():  # opening would create an empty store: say so instead
            raise FeedbackError(f"feedback store not found: {path}")
    try:
        store = open_store(where)
    except StoreError as exc:
        raise FeedbackError(str(exc)) from None
    try:
        labelled = store.labelled_images()
    except Exception as exc:  # noqa: BLE001 - sqlite3 and psycopg errors alike mean "cannot read the store"
        raise FeedbackError(f"the feedback store {name} cannot be read ({type(exc).__name__}: {exc})") from None
    finally:
        store.close()
    return feedback_set(labelled, name, weight)


def feedback_set(labelled, name: str, weight: float) -> FeedbackSet:
    """A ``LabelledImages`` (ids, images, labels, sha256) -> the training set's extra images and their provenance."""
    if not len(labelled.ids):
        raise FeedbackError(
            f"the feedback store {name} has no digit-labelled images (the service keeps them only with "
            f"MNIST_FEEDBACK_IMAGES=1)"
        )
    images = np.ascontiguousarray(labelled.images, dtype=np.uint8)
    labels = np.asarray(labelled.labels, dtype=np.int64)
    if images.shape != (len(labelled.ids), 28, 28) or labels.shape != (len(labelled.ids),):
        raise FeedbackError(f"the feedback store {name} returned images {images.shape} and labels {labels.shape}")
    if labels.min() < 0 or labels.max() > 9:
        raise FeedbackError(f"the feedback store {name} has labels outside 0..9")
    provenance = {
        "store": name,
        "rows": len(labelled.ids),
        "first_id": int(labelled.ids[0]),
        "last_id": int(labelled.ids[-1]),
        "sha256": labelled.sha256,
        "weight": weight,
        "copies_per_epoch": int(weight) * len(labels) + round((weight - int(weight)) * len(labels)),
    }
    return FeedbackSet(torch.from_numpy(images.copy()), torch.from_numpy(labels), provenance)


def oversampled(count: int, weight: float, generator: torch.Generator) -> torch.Tensor:
    """Indices into ``count`` feedback images for one training set: each image ``floor(weight)`` times, and a
    seeded draw of ``round(frac(weight) * count)`` of them once more, so that an epoch sees ``weight`` times as many
    feedback images as there are (in expectation per image, exactly in total up to rounding)."""
    if not weight > 0:
        raise ValueError(f"feedback weight must be positive, got {weight}")
    whole = int(weight)
    extra = round((weight - whole) * count)
    parts = [torch.arange(count)] * whole + [torch.randperm(count, generator=generator)[:extra]]
    return torch.cat(parts)


def with_feedback(
    images: torch.Tensor, labels: torch.Tensor, feedback: FeedbackSet, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels with the feedback images appended, each repeated as its weight says."""
    idx = oversampled(len(feedback.labels), feedback.provenance["weight"], generator)
    log.info(
        "adding %d labelled feedback images from %s (ids %d-%d), %d copies per epoch (weight %g)",
        feedback.provenance["rows"],
        feedback.provenance["store"],
        feedback.provenance["first_id"],
        feedback.provenance["last_id"],
        len(idx),
        feedback.provenance["weight"],
    )
    return torch.cat([images, feedback.images[idx]]), torch.cat([labels, feedback.labels[idx]])
