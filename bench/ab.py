"""``python -m bench.ab``: a focused A/B of HTTP serving, for checking one change; ``make bench`` is the full run.

Starts the servers named, all at once, and takes wrk windows from each in turn (the CPU share of this
machine drifts, so compared windows must alternate), then prints medians as a Markdown table. Besides the
servers of ``make bench`` (bento, bento-unbatched, book-flask, bento-noop) it can start:

- ``--variant NAME:VAR=VALUE,...``: our service with extra environment (e.g. ``w1:MNIST_WORKERS=1``);
- ``--ref NAME:GITREF``: our service as it was at a commit, from a temporary ``git worktree``.

Example, this session's changes against the commit before them:
``python -m bench.ab bento book-flask --ref before:fdafae6 --clients 64 --rounds 3``; with ``--file
screenshot.png`` our service gets that file (``--images`` copies per request) instead of a 28x28 MNIST PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import tempfile
from pathlib import Path

from bench import http
from bench.peers.cpu import cores_used
from training.data import DataError, Normalization, load_mnist, resolve_data_dir, to_model_input

REPO = Path(__file__).resolve().parent.parent
BOOK = REPO.parent / "shared" / "book" / "convnet.pth"


@contextlib.contextmanager
def worktree(ref: str):
    """The repository at ``ref``, checked out in a temporary folder (removed afterwards)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), ref], cwd=REPO, check=True, capture_output=True
        )
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)


def requests(images, per_request: int = 1, file: Path | None = None) -> dict[str, tuple[str, bytes, str]]:
    """server kind -> (path, body, content type): ``per_request`` PNGs per request to our service, as in
    ``make bench`` (or ``per_request`` copies of ``file``); the book's server and the no-op always take one."""
    if file is not None:
        ours = http.multipart([("images", file.name, file.read_bytes(), "application/octet-stream")] * per_request)
    else:
        ours = http.png_request(images.numpy(), per_request)
    return {
        "ours": ("/predict", *ours),
        "book-flask": ("/test", *http.book_request(to_model_input(images[:1], Normalization()).numpy()[0])),
        "bento-noop": ("/noop", *http.NOOP_REQUEST),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("servers", nargs="*", default=["bento", "book-flask"])
    p.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=VALUE,...")
    p.add_argument("--ref", action="append", default=[], metavar="NAME:GITREF")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window", type=int, default=4, help="seconds per wrk window")
    p.add_argument("--images", type=int, default=1, help="PNGs per request to our service (default 1)")
    p.add_argument("--checkpoint", default=str(BOOK), help="the model served by every server")
    p.add_argument("--file", type=Path, help="an image file to send our service instead of a 28x28 MNIST PNG")
    args = p.parse_args(argv)
    if args.file is not None and not args.file.is_file():
        p.error(f"no such file: {args.file}")

    images, _ = load_mnist(resolve_data_dir(), train=False)
    bodies = requests(images, args.images, args.file)
    with tempfile.TemporaryDirectory() as home, contextlib.ExitStack() as stack:
        from export.build import ExportConfig, build

        os.environ["BENTOML_HOME"] = home
        build(ExportConfig(checkpoint=args.checkpoint, out=str(Path(home) / "export"), int8=False))
        known = http.servers(args.checkpoint, home)
        servers = {}
        for name in args.servers:
            if name not in known:
                p.error(f"unknown server {name!r}; known: {', '.join(known)}")
            servers[name] = known[name]
        for spec in args.variant:
            name, _, assignments = spec.partition(":")
            servers[name] = http.bento_server(name, home, dict(a.split("=", 1) for a in assignments.split(",") if a))
        for spec in args.ref:
            name, _, ref = spec.partition(":")
            servers[name] = http.bento_server(name, home, cwd=stack.enter_context(worktree(ref)))
        live = {name: stack.enter_context(server) for name, server in servers.items()}
        loads = {name: (*bodies.get(name, bodies["ours"]), args.window) for name in live}
        watch = {name: functools.partial(cores_used, server) for name, server in live.items()}
        windows = http.interleaved(live, loads, args.clients, args.rounds, watch=watch)
    what = f"{args.file.name} x {args.images}" if args.file else f"{args.images} PNG(s)"
    windows_of = f"medians of {args.rounds} windows of {args.window} s"
    print(f"\n{args.clients} clients, {what} per request to our service, {windows_of}\n")
    print("| server | req/s | images/s | p50 ms | p90 ms | p99 ms | errors | server CPU ms/request | cores |")
    print("| --- " * 9 + "|")
    for name, ws in windows.items():
        m = http.median_of(ws)
        per_request = 1 if name in bodies else args.images
        print(
            f"| {name} | {m['requests_per_s']:,.0f} | {m['requests_per_s'] * per_request:,.0f} | {m['p50_ms']:.1f} | "
            f"{m['p90_ms']:.1f} | {m['p99_ms']:.1f} | {m['errors']} | {m['cpu_ms']:.3f} | {m['cores_used']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except DataError as exc:  # no MNIST: one line that says where to put it, not a traceback
        raise SystemExit(f"error: {exc}") from None
