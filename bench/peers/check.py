"""Before any timing: does a server give the answers in-process ONNX Runtime gives, for the same images?"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench import http
from bench.peers.work import Pipeline

BOOK_IMAGE = http.REPO.parent / "shared" / "book" / "digit_image.jpg"
BOOK_DIGIT = 2  # the chapter's own example
SEQUENTIAL = 5  # samples sent one by one, then together in one request
CONCURRENCY = 16
PROBABILITY_ATOL = 2e-6  # the service rounds probabilities to 6 decimals: up to 5e-7 apart, plus float noise


class PeerMismatch(AssertionError):
    """A server answered differently from in-process ONNX Runtime; the message lists every difference."""


def samples(mnist_u8: np.ndarray) -> list[tuple[str, bytes]]:
    """The book's image, then real MNIST test digits as PNGs: (file name, bytes)."""
    mnist = [(f"{i}.png", http.png(img)) for i, img in enumerate(mnist_u8)]
    return [(BOOK_IMAGE.name, BOOK_IMAGE.read_bytes()), *mnist]


def _post(url: str, files: list[tuple[str, bytes]]) -> list[dict]:
    body, ctype = http.multipart([("images", name, data, "application/octet-stream") for name, data in files])
    response = httpx.post(url, content=body, headers={"content-type": ctype}, timeout=30)
    response.raise_for_status()
    return response.json()


def differences(label: str, got: list[dict], want: list[dict]) -> list[str]:
    if len(got) != len(want):
        return [f"{label}: {len(got)} answers for {len(want)} images"]
    out = []
    for i, (g, w) in enumerate(zip(got, want)):
        diff = np.abs(np.asarray(g["probabilities"], dtype=np.float64) - w["probabilities"]).max()
        if g["digit"] != w["digit"] or diff > PROBABILITY_ATOL or abs(g["confidence"] - w["confidence"]) > 1e-6:
            out.append(f"{label}[{i}]: digit {g['digit']} vs {w['digit']}, max probability difference {diff:.2g}")
    return out


def _concurrent(url: str, files: list, want: list[dict], multi_image: bool) -> list[str]:
    """Every image alone, plus (``multi_image``) requests of 1 to 8 images, all sent from 16 threads at once,
    so that a batching server merges them: each answer must still be its own request's."""
    jobs = [[i] for i in range(len(files))]
    if multi_image:
        jobs += [list(range(start, start + size)) for size in range(1, 9) for start in range(0, len(files) - size, 9)]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        answers = pool.map(lambda job: _post(url, [files[i] for i in job]), jobs)
        return [
            d for job, got in zip(jobs, answers) for d in differences(f"concurrent {job}", got, [want[i] for i in job])
        ]


def check_peer(url: str, path: str, export_dir: Path, mnist_u8: np.ndarray, multi_image: bool = True) -> str:
    """Compare a server's answers with in-process ONNX Runtime: the book's image and the first MNIST digits
    one by one, then all of them in one request, then everything at once from many threads (see _concurrent).

    Raises PeerMismatch listing every difference. A server that declares ``multi_image=False`` must still
    answer each image alone; what it does with the many-file request is returned, not judged."""
    reference = Pipeline(export_dir)
    files = samples(mnist_u8)
    want = [reference([data])[0] for _, data in files]
    problems = [] if want[0]["digit"] == BOOK_DIGIT else [f"in-process: the book's image is {want[0]['digit']}"]
    first = files[:SEQUENTIAL]
    for (name, data), w in zip(first, want):
        got = _post(url + path, [(name, data)])
        problems += differences(name, got, [w])
        if name == BOOK_IMAGE.name and got and got[0]["digit"] != BOOK_DIGIT:
            problems.append(f"the book's image answered {got[0]['digit']}, not {BOOK_DIGIT}")
    got = _post(url + path, first)
    many = differences(f"{len(first)} files in one request", got, want[: len(first)])
    problems += many if multi_image else []
    problems += _concurrent(url + path, files, want, multi_image)
    if problems:
        raise PeerMismatch(f"{url}{path}: " + "; ".join(problems[:10]))
    together = f"{len(files)} images under concurrent load: same answers as in-process ONNX Runtime"
    if not many:
        return f"{len(first)} images alone and in one request, {together}"
    last = (
        "the last file's answer"
        if not differences("last", got, want[len(first) - 1 : len(first)])
        else "not the last's"
    )
    return f"{len(first)} images alone: same answers; in one request: {len(got)} answer(s), {last}; {together}"
