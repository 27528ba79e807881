"""``python -m deploy build|check``: thin CLI over deploy.container and deploy.check; user errors are one line."""

from __future__ import annotations

import argparse
import logging
import sys

from deploy.check import CheckConfig, run_checks
from deploy.container import ContainerConfig, ContainerError, build_image
from deploy.wheelhouse import WheelhouseError


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy", description="Build and check the service's images.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="bentoml build + bentoml containerize, tagged <name>:<version> and :latest")
    b.add_argument("--bentofile", default=ContainerConfig.bentofile, help="default %(default)s")
    b.add_argument(
        "--base-image",
        default=None,
        help="another base than the bentofile's, e.g. python:3.11-slim from a registry "
        "(default: the bentofile's, built here by deploy/base-image.sh when missing)",
    )
    c = sub.add_parser("check", help="run an image and check it as a user would")
    c.add_argument("image", nargs="?", default=CheckConfig.image, help="default %(default)s")
    c.add_argument("--digit-image", default=CheckConfig.digit_image, help="default the book's digit_image.jpg")
    c.add_argument("--expected-digit", type=int, default=CheckConfig.expected_digit)
    c.add_argument(
        "--grace", type=positive_int, default=CheckConfig.grace_s, help="docker stop -t, default %(default)s s"
    )
    c.add_argument("--clients", type=positive_int, default=CheckConfig.clients, help="default %(default)s")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("deploy").setLevel(logging.INFO)
    log = logging.getLogger("deploy")
    try:
        if args.command == "build":
            built = build_image(ContainerConfig(bentofile=args.bentofile, base_image=args.base_image))
            log.info(
                "built %s from %s on %s: %.0f MB, containerize %.0f s",
                " and ".join(built.tags),
                built.bento,
                built.base_image,
                built.size_bytes / 1e6,
                built.seconds,
            )
            return 0
        cfg = CheckConfig(
            image=args.image,
            digit_image=args.digit_image,
            expected_digit=args.expected_digit,
            grace_s=args.grace,
            clients=args.clients,
        )
        results = run_checks(cfg)
    except (ContainerError, WheelhouseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    for result in results:
        log.info("%-4s %-12s %s", "ok" if result.passed else "FAIL", result.name, result.detail)
    failed = [r.name for r in results if not r.passed]
    if failed:
        log.info("%s: %d of %d checks failed (%s)", cfg.image, len(failed), len(results), ", ".join(failed))
        return 1
    log.info("%s: all %d checks passed", cfg.image, len(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
