#!/usr/bin/env bash
# A Docker engine for `make container`: installs Debian's docker.io (and mmdebstrap, which deploy/base-image.sh
# uses) when missing, and starts dockerd when no engine answers (through systemd where it runs, else by hand,
# logging to /var/log/dockerd.log).
set -euo pipefail

die() { echo "error: $*" >&2; exit 1; }
SUDO=()
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "not root and no sudo: install docker.io and mmdebstrap, and start dockerd"
    SUDO=(sudo)
fi

missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "no apt-get: install ${missing[*]} by hand"
    echo "installing ${missing[*]} with apt-get"
    "${SUDO[@]}" apt-get update -q >/dev/null
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

docker info >/dev/null 2>&1 && exit 0
if [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl start docker
else
    echo "starting dockerd (log: /var/log/dockerd.log)"
    "${SUDO[@]}" sh -c 'nohup dockerd >/var/log/dockerd.log 2>&1 &'
fi
for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && exit 0
    sleep 0.5
done
die "dockerd did not answer within 30 s; see /var/log/dockerd.log"
