"""The not-a-digit detector: a small network beside the classifier that scores how much the model's input looks like
a digit at all, fitted at export and shipped as ``detector.onnx`` in the export folder.

It is trained with outlier exposure: MNIST training digits (as they are, with thicker and thinner strokes, and as
photos, screenshots and transparent PNGs of them, through the service's own preprocessing) against synthetic
non-digits (export/samples/nondigits.py). Its threshold is set on training digits it never saw, so that at most
``TARGET_DIGITS_FLAGGED`` of them are flagged; the report measures it on the MNIST test set, on photo-style test
digits, and on non-digits drawn from seeds the training never used.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from export import formats
from export.samples import nondigits, realistic

log = logging.getLogger(__name__)

FILE = "detector.onnx"
INPUT_NAME, OUTPUT_NAME = formats.INPUT_NAME, "digit_score"  # the classifier's input, the same array
# the targets, checked in the report: digits flagged at most, non-digits flagged at least
TARGET_DIGITS_FLAGGED = 0.01
TARGET_PHOTO_DIGITS_FLAGGED = 0.03
TARGET_NONDIGITS_FLAGGED = 0.90
# The threshold flags at most these shares of held-out training digits, as they are and as photos, screenshots and
# transparent PNGs: below the targets, so that the test digits meet them
THRESHOLD_FLAGS = 0.005
THRESHOLD_PHOTO_FLAGS = 0.015
VARIANTS = (*realistic.KINDS, "thick", "thin", "slanted")
EVAL_SEED_BASE = 1_000_000  # evaluation inputs use seeds from here on; training ones stay below
HOLDOUT_SEED_BASE = 2_000_000  # and the held-out photos of the threshold, from here


@dataclass(frozen=True)
class DetectorConfig:
    digits: int = 30_000  # MNIST training digits as they are (from the front of the training set)
    variants: int = 14_000  # thick, thin, slanted, photographed, screenshotted: each made from one training digit
    nondigits_per_family: int = 5_000
    holdout: int = 5_000  # training digits the detector never sees (the last of the set): the threshold's
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    eval_nondigits_per_family: int = 400
    eval_photo_digits_per_kind: int = 250

    @classmethod
    def quick(cls) -> DetectorConfig:
        """For tests: the same recipe, a tenth of the data."""
        return cls(
            digits=3000,
            variants=1200,
            nondigits_per_family=500,
            holdout=2000,
            epochs=3,
            eval_nondigits_per_family=100,
            eval_photo_digits_per_kind=50,
        )


class DigitDetector(nn.Module):
    """The model's normalized input [N, 1, 28, 28] -> the probability [N] that it is a digit."""

    def __init__(self):
        super().__init__()
        self.example_input_array = torch.zeros(2, 1, 28, 28)
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1),
            nn.ReLU(),  # 14x14
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),  # 7x7
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(),  # 4x4
            nn.Flatten(),
        )
        self.head = nn.Linear(32 * 4 * 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.features(x)).squeeze(1))


def _variant(digit_u8: np.ndarray, i: int, seed: int) -> np.ndarray:
    """A training digit as users send it: the service's preprocessing of a photo, a screenshot or a transparent
    PNG of it, or of the digit drawn with a thicker or thinner pen, or written at a slant (up to 25 degrees)."""
    from service.inputs.preprocess import image_to_mnist, mnist_style

    kind = VARIANTS[i % len(VARIANTS)]
    if kind in realistic.KINDS:
        return image_to_mnist(realistic.make(kind, digit_u8, seed))
    rng = np.random.default_rng(seed)
    big = np.kron(digit_u8.astype(np.float32) / 255.0, np.ones((4, 4), np.float32))  # 112 px: room for a pen
    if kind == "slanted":
        return mnist_style(ndimage.rotate(big, rng.uniform(-25, 25), reshape=True, order=1).clip(0, 1))
    size = int(rng.integers(3, 9))
    pen = ndimage.grey_dilation if kind == "thick" else ndimage.grey_erosion
    return mnist_style(pen(big, size=(size, size)))


def _pair(digits_u8: np.ndarray, seed: int) -> np.ndarray:
    """Two digits side by side, as one image: a number, not a digit."""
    from service.inputs.preprocess import mnist_style

    rng = np.random.default_rng(seed)
    a, b = digits_u8[rng.integers(len(digits_u8), size=2)].astype(np.float32) / 255.0
    gap = int(rng.integers(-4, 4))  # touching, overlapping a little, or apart
    pair = np.zeros((28, 56 + gap), np.float32)
    pair[:, :28] = a
    pair[:, 28 + gap : 56 + gap] = np.maximum(pair[:, 28 + gap : 56 + gap], b)
    return mnist_style(pair)


def _nondigit(family: str, seed: int) -> np.ndarray:
    from service.inputs.preprocess import image_to_mnist

    return image_to_mnist(nondigits.make(family, seed))


def _stack(make, n: int, desc: str) -> np.ndarray:
    if n == 0:
        return np.zeros((0, 28, 28), np.float32)
    return np.stack([make(i) for i in tqdm(range(n), desc=desc, unit="image", leave=False, disable=None)])


def training_set(train_u8: np.ndarray, cfg: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, 28, 28] in 0..1, labels: 1 digit, 0 not) from the training digits before the held-out ones."""
    usable = len(train_u8) - cfg.holdout
    if usable < 1:
        raise ValueError(f"the detector needs more than its {cfg.holdout} held-out training digits")
    rng = np.random.default_rng(cfg.seed)
    plain = train_u8[rng.permutation(usable)[: cfg.digits]].astype(np.float32) / 255.0
    picks = rng.integers(0, usable, cfg.variants)
    variants = _stack(lambda i: _variant(train_u8[picks[i]], i, cfg.seed * 7919 + i), cfg.variants, "digit variants")
    families = nondigits.FAMILIES
    n = cfg.nondigits_per_family * len(families)
    others = _stack(lambda i: _nondigit(families[i % len(families)], i // len(families)), n, "non-digits")
    pairs = _stack(lambda i: _pair(train_u8[:usable], cfg.seed * 104729 + i), cfg.nondigits_per_family, "pairs")
    others = np.concatenate([others, pairs])
    images = np.concatenate([plain, variants, others])
    labels = np.concatenate([np.ones(len(plain) + len(variants)), np.zeros(len(others))]).astype(np.float32)
    return images, labels


def fit(images: np.ndarray, labels: np.ndarray, mean: float, std: float, cfg: DetectorConfig) -> DigitDetector:
    torch.manual_seed(cfg.seed)
    model = DigitDetector()
    x = torch.from_numpy((images[:, None] - mean) / std).float()
    y = torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * ((len(x) + cfg.batch_size - 1) // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.train()
    with tqdm(total=steps, desc="fitting the detector", unit="step", leave=False, disable=None) as bar:
        for _ in range(cfg.epochs):
            for idx in torch.randperm(len(x), generator=generator).split(cfg.batch_size):
                loss = nn.functional.binary_cross_entropy(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
    return model.eval()


def scores(model: DigitDetector, images: np.ndarray, mean: float, std: float) -> np.ndarray:
    x = torch.from_numpy((images[:, None] - mean) / std).float()
    with torch.no_grad():
        return torch.cat([model(b) for b in x.split(1024)]).numpy() if len(x) else np.zeros(0, np.float32)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The chance that a digit scores above a non-digit (ties count half): the Mann-Whitney statistic."""
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([positive, negative]))
    n_p, n_n = len(positive), len(negative)
    return float((r[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def photo_digits(digits_u8: np.ndarray, n: int, seed_base: int) -> dict[str, np.ndarray]:
    """``n`` digits of each realistic kind, through the service's preprocessing."""
    from service.inputs.preprocess import image_to_mnist

    return {
        f"digits/{kind}": _stack(
            lambda i, kind=kind: image_to_mnist(realistic.make(kind, digits_u8[i], seed_base + i)), n, kind
        )
        for kind in realistic.KINDS
    }


def evaluation_sets(test_u8: np.ndarray, cfg: DetectorConfig) -> dict[str, np.ndarray]:
    """The report's inputs, none of them seen in training: photo-style test digits and non-digits of other seeds."""
    sets = photo_digits(test_u8, cfg.eval_photo_digits_per_kind, EVAL_SEED_BASE)
    for family in nondigits.FAMILIES:
        sets[f"nondigits/{family}"] = _stack(
            lambda i, family=family: _nondigit(family, EVAL_SEED_BASE + i), cfg.eval_nondigits_per_family, family
        )
    n = cfg.eval_nondigits_per_family
    sets["nondigits/pairs"] = _stack(lambda i: _pair(test_u8, EVAL_SEED_BASE + i), n, "pairs")  # of test digits
    return sets


def report(
    model: DigitDetector, holdout_u8: np.ndarray, test_u8: np.ndarray, mean: float, std: float, cfg: DetectorConfig
) -> dict:
    """The threshold, set on held-out training digits, and what it does on every evaluation set."""
    held = scores(model, holdout_u8.astype(np.float32) / 255.0, mean, std)
    photos = photo_digits(holdout_u8, cfg.eval_photo_digits_per_kind, HOLDOUT_SEED_BASE)
    held_photos = scores(model, np.concatenate(list(photos.values())), mean, std)
    threshold = min(float(np.quantile(held, THRESHOLD_FLAGS)), float(np.quantile(held_photos, THRESHOLD_PHOTO_FLAGS)))
    test = scores(model, test_u8.astype(np.float32) / 255.0, mean, std)
    per_set = {"digits/mnist_test": test}
    per_set.update({k: scores(model, v, mean, std) for k, v in evaluation_sets(test_u8, cfg).items()})
    flagged = {k: float((v < threshold).mean()) for k, v in per_set.items()}
    photo = np.concatenate([v for k, v in per_set.items() if k.startswith("digits/") and k != "digits/mnist_test"])
    others = np.concatenate([v for k, v in per_set.items() if k.startswith("nondigits/")])
    summary = {
        "mnist_test_flagged": flagged["digits/mnist_test"],
        "photo_digits_flagged": float((photo < threshold).mean()),
        "nondigits_flagged": float((others < threshold).mean()),
        "auroc": auroc(np.concatenate([test, photo]), others),
    }
    targets = {
        "mnist_test_flagged_at_most": TARGET_DIGITS_FLAGGED,
        "photo_digits_flagged_at_most": TARGET_PHOTO_DIGITS_FLAGGED,
        "nondigits_flagged_at_least": TARGET_NONDIGITS_FLAGGED,
    }
    met = (
        summary["mnist_test_flagged"] <= TARGET_DIGITS_FLAGGED
        and summary["photo_digits_flagged"] <= TARGET_PHOTO_DIGITS_FLAGGED
        and summary["nondigits_flagged"] >= TARGET_NONDIGITS_FLAGGED
    )
    return {
        "threshold": threshold,
        "threshold_set_on": (
            f"{len(held)} held-out training digits and {len(held_photos)} photo-style ones made from them: at most "
            f"{100 * THRESHOLD_FLAGS:g}% and {100 * THRESHOLD_PHOTO_FLAGS:g}% of them flagged"
        ),
        **summary,
        "flagged": flagged,
        "sizes": {k: len(v) for k, v in per_set.items()},
        "targets": targets,
        "targets_met": met,
    }


def build_detector(
    train_u8: np.ndarray, test_u8: np.ndarray, mean: float, std: float, out: Path, opset: int, cfg: DetectorConfig
) -> tuple[DigitDetector, dict]:
    """Fit, threshold, measure and export: (the detector, the manifest's ``detector`` section less the file)."""
    images, labels = training_set(train_u8, cfg)
    model = fit(images, labels, mean, std, cfg)
    found = report(model, train_u8[len(train_u8) - cfg.holdout :], test_u8, mean, std, cfg)
    formats.export_onnx(model, out / FILE, opset, output_name=OUTPUT_NAME)
    log.info(
        "not-a-digit detector: AUROC %.4f; flags %.2f%% of MNIST test digits, %.2f%% of photo-style digits, "
        "%.1f%% of non-digits (targets %s)",
        found["auroc"],
        100 * found["mnist_test_flagged"],
        100 * found["photo_digits_flagged"],
        100 * found["nondigits_flagged"],
        "met" if found["targets_met"] else "NOT met",
    )
    return model, {**found, "input": INPUT_NAME, "output": OUTPUT_NAME, "config": asdict(cfg)}
