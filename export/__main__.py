"""``python -m export build|verify|register|sign``: a thin CLI; user errors are one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from export.build import ExportConfig, ExportError, build, verify_dir
from export.formats import DEFAULT_OPSET
from export.signing import SigningError
from export.verify import VerificationError
from training.checkpoint import CheckpointError
from training.data import DataError
from training.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export", description="Export the ConvNet and prove each format equivalent."
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="export a checkpoint to TorchScript, ONNX and torch.export, verify, register")
    b.add_argument(
        "--checkpoint", required=True, help="the project's convnet.pt or a plain state_dict (e.g. the book's)"
    )
    b.add_argument("--out", default=ExportConfig.out, help=f"output folder, default {ExportConfig.out}")
    b.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, default {DEFAULT_OPSET}")
    b.add_argument("--no-register", action="store_true", help="do not add the result to the BentoML model store")
    b.add_argument("--no-int8", action="store_true", help="skip the INT8 ONNX variant")
    b.add_argument("--sign-key", default=None, help="PEM EC private key: sign the folder (model.sig), then register")
    b.add_argument(
        "--data-dir", default=None, help="MNIST folder for verification (default $MNIST_DATA_DIR, then ./data)"
    )
    v = sub.add_parser("verify", help="check an export folder's files against its manifest, then re-run the numbers")
    v.add_argument("dir", help="the folder `build` wrote")
    v.add_argument("--data-dir", default=None)
    r = sub.add_parser("register", help="add a built folder to the BentoML model store unless it is there already")
    r.add_argument("dir", help="the folder `build` wrote")
    s = sub.add_parser("sign", help="sign a built folder (model.sig); then `register` it")
    s.add_argument("dir", help="the folder `build` wrote")
    s.add_argument("--key", required=True, help="PEM EC private key (P-256, P-384 or P-521)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.quiet)
    log = logging.getLogger("export")
    try:
        if args.command == "build":
            cfg = ExportConfig(
                checkpoint=args.checkpoint,
                out=args.out,
                opset=args.opset,
                register=not args.no_register,
                int8=not args.no_int8,
                data_dir=args.data_dir,
                sign_key=args.sign_key,
            )
            result = build(cfg)
            report = result.manifest["verification"]
            log.info(
                "verified %s at batch sizes %s; wrote %s/manifest.json%s",
                ", ".join(report["formats"]),
                report["batch_sizes"],
                result.out,
                f"; registered {result.tag}" if result.tag else "",
            )
        elif args.command == "sign":
            from export.build import check_files, read_manifest
            from export.signing import sign_folder

            check_files(args.dir, read_manifest(args.dir))  # sign only a folder that is what its manifest says
            signature = sign_folder(args.dir, args.key)
            log.info("wrote %s; `python -m export register %s` puts it in the model store", signature, args.dir)
        elif args.command == "register":
            from export.build import check_files, read_manifest
            from export.store import ensure_registered

            manifest = read_manifest(args.dir)
            check_files(args.dir, manifest)
            tag, added = ensure_registered(Path(args.dir), manifest)
            log.info("%s %s in the BentoML model store", "registered" if added else "already have", tag)
        else:
            report = verify_dir(args.dir, args.data_dir)
            worst = max(r["max_abs_diff"] for fmt, r in report["formats"].items() if not fmt.endswith("-int8"))
            log.info(
                "%s: all files match the manifest; %s agree with eager (worst max abs diff %.3g)",
                args.dir,
                ", ".join(report["formats"]),
                worst,
            )
    except (VerificationError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, DataError, SigningError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
