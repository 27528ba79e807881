#!/usr/bin/env bash
# The base image for hosts that cannot pull python:3.11-slim from a registry (the air-gapped path): Debian
# bookworm (minbase) with Python 3.11 and uv, built from Debian packages with mmdebstrap and `docker import`ed.
# Its CA bundle is Debian's ca-certificates package, nothing from this host.
#
#   deploy/base-image.sh [TAG]     (default: mnist-serving/python:3.11-bookworm, the name bentofile.yaml uses)
#
# DEBIAN_MIRROR picks another mirror; PYTHON is the interpreter whose pip downloads uv (default python3).
set -euo pipefail

TAG=${1:-mnist-serving/python:3.11-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PYTHON=${PYTHON:-python3}
# BentoML's generated Dockerfile pip-installs uv 0.13.4 unless it finds uv >= 0.13.4; it is in the image
# already, so the build needs no pip and no index for it.
UV_VERSION=0.13.4

die() { echo "error: $*" >&2; exit 1; }
[ $# -le 1 ] || die "usage: $0 [TAG]"
[[ $TAG =~ ^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?$ ]] || die "'$TAG' is not a valid image name"
command -v mmdebstrap >/dev/null || die "mmdebstrap is not installed (apt-get install mmdebstrap)"
docker info >/dev/null 2>&1 || die "no Docker engine answers (deploy/docker-up.sh starts one)"
[ "$(uname -m)" = x86_64 ] || die "this script builds amd64 images; $(uname -m) hosts are not supported"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
    --dest "$work" "uv==$UV_VERSION" || die "could not download uv $UV_VERSION with $PYTHON -m pip"
"$PYTHON" - "$work" "$UV_VERSION" <<'PY'
import sys, zipfile, pathlib
work, version = pathlib.Path(sys.argv[1]), sys.argv[2]
wheel = next(work.glob(f"uv-{version}-*.whl"))
with zipfile.ZipFile(wheel) as z:
    (work / "uv").write_bytes(z.read(f"uv-{version}.data/scripts/uv"))
PY
chmod 755 "$work/uv"

# Debian's own slim images leave out the same documentation; copyright files stay.
# merged /usr set up directly (as debootstrap does), not through the usrmerge package and its 47 MB of Perl
mmdebstrap --variant=minbase --mode=root --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --include=python3,ca-certificates \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='copy-in '"$work"'/uv /usr/local/bin' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
    bookworm "$work/rootfs.tar" \
    "deb $MIRROR bookworm main" \
    "deb $MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main" \
    >"$work/mmdebstrap.log" 2>&1 || { tail -n 30 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed (its last lines are above)"; }

docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --change "LABEL org.opencontainers.image.description=\"Debian bookworm minbase, Python 3.11, uv $UV_VERSION\"" \
    "$work/rootfs.tar" "$TAG" >/dev/null
docker run --rm "$TAG" sh -c 'python3 --version && uv --version'
echo "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}'))"
