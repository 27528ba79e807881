"""The images people really send, made from real MNIST test digits: what the benchmarks send besides the 28x28
PNG, and what ``python -m bench.workloads`` times through the service's own preprocessing, in process.

Kinds: ``mnist_png`` (the 28x28 bench image), ``canvas`` (the page's 280x280 drawing pad, as it uploads it:
an opaque RGBA PNG, white strokes on black), ``screenshot_300`` / ``screenshot_600`` (dark digit on a light
window with a frame and text-like clutter, RGB PNG), ``photo_1mp`` / ``photo_12mp`` (a phone photo of paper:
uneven light, noise, blur, JPEG quality 90).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KINDS = ("mnist_png", "canvas", "screenshot_300", "screenshot_600", "photo_1mp", "photo_12mp")
# The mix a deployment of the page sees, by request: mostly drawings, then screenshots, a few photos.
MIX = {"canvas": 6, "screenshot_300": 2, "screenshot_600": 1, "photo_1mp": 1}


def _digit(digit_u8: np.ndarray, side: int) -> np.ndarray:
    """The 28x28 digit (0..255) scaled to side x side, 0..1."""
    img = Image.fromarray(digit_u8.astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make(kind: str, digit_u8: np.ndarray, seed: int = 0) -> bytes:
    """One encoded image of ``kind`` showing the MNIST digit ``digit_u8`` (28x28 uint8, white on black)."""
    rng = np.random.default_rng(seed)
    if kind == "mnist_png":
        return _png(Image.fromarray(digit_u8.astype(np.uint8), "L"))
    if kind == "canvas":
        ink = np.zeros((280, 280), dtype=np.float32)
        side = int(rng.integers(150, 230))
        top, left = (int(rng.integers(5, 280 - side - 5)) for _ in range(2))
        ink[top : top + side, left : left + side] = _digit(digit_u8, side)
        value = (ink.clip(0, 1) * 255).astype(np.uint8)
        rgba = np.stack([value, value, value, np.full_like(value, 255)], axis=-1)
        return _png(Image.fromarray(rgba, "RGBA"))
    if kind.startswith("screenshot_"):
        size = int(kind.rsplit("_", 1)[1])
        h, w = size, int(size * 1.25)
        page = np.full((h, w), 0.96, dtype=np.float32)
        page[: h // 12] = 0.8  # a title bar
        side = int(rng.uniform(0.4, 0.7) * h)
        top = int(rng.integers(h // 12 + 4, h - side - 4))
        left = int(rng.integers(4, w - side - 4))
        page[top : top + side, left : left + side] -= 0.9 * _digit(digit_u8, side)
        img = Image.fromarray((page.clip(0, 1) * 255).astype(np.uint8), "L").convert("RGB")
        draw = ImageDraw.Draw(img)
        draw.rectangle((1, 1, w - 2, h - 2), outline=(120, 120, 120))  # the window's frame
        draw.text((8, 2), "digit.png - Viewer", fill=(20, 20, 20))
        return _png(img)
    if kind.startswith("photo_"):
        megapixels = int(kind.rsplit("_", 1)[1].removesuffix("mp"))
        w = int(round((megapixels * 1e6 * 4 / 3) ** 0.5))
        h = int(round(w * 3 / 4))
        small_h, small_w = 480, 640  # lighting and ink drawn small, then scaled up (as a lens blurs them)
        ink = np.zeros((small_h, small_w), dtype=np.float32)
        side = int(rng.uniform(0.35, 0.6) * small_h)
        top, left = int(rng.integers(20, small_h - side - 20)), int(rng.integers(20, small_w - side - 20))
        ink[top : top + side, left : left + side] = _digit(digit_u8, side)
        ys, xs = np.mgrid[0:small_h, 0:small_w]
        light = 0.75 + 0.18 * (xs / small_w) - 0.1 * (ys / small_h)
        gray = light * (1 - 0.8 * ink)
        rgb = np.stack([gray, gray * 0.97, gray * 0.9], axis=-1)
        big = Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8), "RGB").resize((w, h), Image.Resampling.BILINEAR)
        noise = rng.normal(0, 6, (h, w, 1)).astype(np.float32)
        noisy = (np.asarray(big, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy, "RGB").filter(ImageFilter.GaussianBlur(1)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()
    raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def mnist_digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` MNIST test digits (uint8, [n, 28, 28]) and their labels."""
    from training.data import load_mnist, resolve_data_dir

    images, labels = load_mnist(resolve_data_dir(None), train=False)
    return images[:n].numpy(), labels[:n].numpy()


def preprocessing_ms(data: bytes, repeat: int = 20) -> float:
    """The median milliseconds the service's preprocessing takes on one encoded image, in this process."""
    from service.inputs.preprocess import image_to_mnist

    image_to_mnist(data)  # warm
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        image_to_mnist(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def preprocessing_at(ref: str):
    """service/inputs/preprocess.py as it was at the git commit ``ref``, imported beside today's."""
    import importlib.util
    import subprocess
    import tempfile
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{ref}:service/inputs/preprocess.py"], cwd=repo, check=True, capture_output=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"preprocess_{ref}.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare(ref: str, kinds, rounds: int = 5) -> None:
    """Milliseconds per image, this tree's preprocessing against ``ref``'s, alternating rounds: medians."""
    from service.inputs import preprocess as now

    before = preprocessing_at(ref)
    digits, _ = mnist_digits(8)
    print(f"| input | bytes | {ref} ms | now ms | ratio |\n| --- | --- | --- | --- | --- |")
    for kind in kinds:
        files = [make(kind, digits[i], seed=i) for i in range(4 if kind == "photo_12mp" else 8)]
        times = {before: [], now: []}
        for _ in range(rounds):
            for module in (before, now):
                module.image_to_mnist(files[0])
                start = time.perf_counter()
                for data in files:
                    module.image_to_mnist(data)
                times[module].append((time.perf_counter() - start) / len(files) * 1000)
        old, new = statistics.median(times[before]), statistics.median(times[now])
        size = sum(map(len, files)) // len(files)
        print(f"| {kind} | {size:,} | {old:.2f} | {new:.2f} | {old / new:.1f}x |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.workloads", description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--save", metavar="DIR", help="also write one file of each kind to DIR")
    p.add_argument("--against", metavar="GITREF", help="compare with the preprocessing at this commit")
    args = p.parse_args(argv)
    if args.against:
        return compare(args.against, args.kinds)
    digits, _ = mnist_digits(1)
    print("| input | bytes | preprocessing ms (median, one core) |\n| --- | --- | --- |")
    for kind in args.kinds:
        data = make(kind, digits[0])
        if args.save:
            from pathlib import Path

            suffix = "jpg" if kind.startswith("photo") else "png"
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"{kind}.{suffix}").write_bytes(data)
        print(f"| {kind} | {len(data):,} | {preprocessing_ms(data, args.repeat):.2f} |")


if __name__ == "__main__":
    main()
