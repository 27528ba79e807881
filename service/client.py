"""``python -m service.client IMAGE... [--url URL] [--token TOKEN]``: classify image files with a running server.

Built on ``bentoml.SyncHTTPClient``; the same calls work from any Python program::

    from service.client import classify
    classify(["digit.png"], url="http://localhost:3000", token=None)

The token (for a server started with ``MNIST_API_TOKEN``) defaults to ``$MNIST_API_TOKEN``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_URL = os.environ.get("MNIST_URL", "http://localhost:3000")
DEFAULT_TOKEN = os.environ.get("MNIST_API_TOKEN") or None


class ClientError(Exception):
    pass


def classify(
    paths: list[str | os.PathLike], url: str = DEFAULT_URL, timeout: float = 30, token: str | None = DEFAULT_TOKEN
) -> list[dict]:
    """One prediction dict per image file, in order."""
    import bentoml

    files = [Path(p) for p in paths]
    for f in files:
        if not f.is_file():
            raise ClientError(f"no such file: {f}")
    try:
        client = bentoml.SyncHTTPClient(url, timeout=timeout, token=token)
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, TLS: all mean "no server there"
        raise ClientError(
            f"cannot reach the service at {url} ({type(exc).__name__}); is `bentoml serve` running?"
        ) from None
    try:
        return client.predict(images=files)
    except bentoml.exceptions.BentoMLException as exc:
        raise ClientError(f"the service refused the request (HTTP {int(exc.error_code)}): {_message(exc)}") from None
    finally:
        client.close()


def _message(exc: Exception) -> str:
    """The service's own message, from its {"error": ...} body when there is one."""
    try:
        return json.loads(str(exc))["error"]
    except (ValueError, KeyError, TypeError):
        return str(exc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.client", description="Classify handwritten-digit images.")
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--url", default=DEFAULT_URL, help=f"service address (default $MNIST_URL or {DEFAULT_URL})")
    p.add_argument("--token", default=DEFAULT_TOKEN, help="API token, if the server has one (default $MNIST_API_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    args = p.parse_args(argv)
    try:
        results = classify(args.images, url=args.url, token=args.token)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for path, r in zip(args.images, results):
            print(f"{path}: {r['digit']} ({100 * r['confidence']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
