#!/usr/bin/env bash
# Run numba_attn on aarch64 under user-mode emulation (qemu + proot), from an x86_64 Linux host.
#
# Idempotent: the Debian arm64 root filesystem and its virtual environment are built once under
# $AARCH64_ROOT (default .ci/aarch64) and reused. Needs root and Debian's package registry
# (apt-get, deb.debian.org) plus PyPI. binfmt_misc is not needed (proot drives qemu itself).
#
#   scripts/test-aarch64.sh            # set up (once), install numba_attn, run the emulated subset
#   AARCH64_TESTS=full scripts/...     # the whole pytest suite instead (hours under emulation)
#
# The default subset is `python -m numba_attn check --quick`: every kernel (prefill, split-K decode,
# int8) in every precision (float32, float64, float16, int8) once against the float64 reference,
# plus concurrent calls from 8 Python threads under the layer a bare board gets (workqueue).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="${AARCH64_ROOT:-$here/.ci/aarch64}"
ROOTFS="$ROOT/rootfs"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
log() { printf '[aarch64 %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

need=()
for tool in proot qemu-aarch64-static debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" != 0 ]; then
    log "SKIPPED: ${need[*]} missing and installing them needs root (apt-get); nothing was emulated"
    exit 0
fi
if [ ${#need[@]} -gt 0 ]; then
    log "installing qemu-user-static debootstrap proot (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap proot >/dev/null
fi

run_in() {  # run a command inside the arm64 root filesystem
    proot -q qemu-aarch64-static -0 -r "$ROOTFS" -w / -b /proc -b /dev -b /sys -b "$here:/src" "$@"
}

if [ ! -f "$ROOTFS/.unpacked" ]; then
    log "debootstrap (download, first stage) into $ROOTFS"
    rm -rf "$ROOTFS"
    mkdir -p "$ROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase \
        --include=python3,python3-venv,python3-pip,ca-certificates bookworm "$ROOTFS" "$MIRROR"
    cp "$(command -v qemu-aarch64-static)" "$ROOTFS/usr/bin/"
    # debootstrap's second stage would configure every package under emulation (~15 minutes on 2 cores);
    # running python needs only the packages' files, so unpack every downloaded package natively instead
    # (keeping the merged-/usr links), then let the emulated ldconfig index the libraries
    log "unpacking $(ls "$ROOTFS"/var/cache/apt/archives/*.deb | wc -l) packages natively"
    for deb in "$ROOTFS"/var/cache/apt/archives/*.deb; do
        dpkg-deb --fsys-tarfile "$deb" | tar -x --keep-directory-symlink -C "$ROOTFS"
    done
    # the first stage leaves proc as a link to the host's /proc, which the -b /proc binding cannot follow
    if [ -L "$ROOTFS/proc" ]; then rm "$ROOTFS/proc" && mkdir "$ROOTFS/proc"; fi
    run_in /sbin/ldconfig
    touch "$ROOTFS/.unpacked"
fi
cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf" 2>/dev/null || true

if [ ! -x "$ROOTFS/opt/venv/bin/python" ]; then
    log "creating the arm64 virtual environment"
    run_in /usr/bin/python3 -m venv /opt/venv
fi
log "installing numba_attn into the arm64 venv"
rm -rf "$ROOTFS/opt/src" && mkdir -p "$ROOTFS/opt/src"
# copy the tracked tree (not .venv, caches or the rootfs itself)
(cd "$here" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$ROOTFS/opt/src"
# only numba and numpy: the subset needs nothing else (the test extra's torch/transformers would take
# an hour under emulation); the full run adds pytest and hypothesis
run_in /usr/bin/env PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/venv/bin/pip install -q "/opt/src"
if [ "${AARCH64_TESTS:-subset}" = full ]; then
    run_in /usr/bin/env PIP_DISABLE_PIP_VERSION_CHECK=1 /opt/venv/bin/pip install -q pytest hypothesis
fi

log "running on $(run_in /opt/venv/bin/python -c 'import platform; print(platform.machine())')"
run_in /opt/venv/bin/python -c "import platform, numba, numpy; print('platform.machine():', platform.machine(), '| numba', numba.__version__, '| numpy', numpy.__version__)"
if [ "${AARCH64_TESTS:-subset}" = full ]; then
    # pytest and hypothesis only: tests of the examples need the test extra and fail without it
    run_in /usr/bin/env HOME=/root /bin/sh -c "cd /opt/src && /opt/venv/bin/python -m pytest -q -x"
else
    run_in /usr/bin/env HOME=/root /bin/sh -c "cd /tmp && /opt/venv/bin/python -m numba_attn info && /opt/venv/bin/python -m numba_attn check --quick && /opt/venv/bin/python /opt/src/scripts/threads_smoke.py && /opt/venv/bin/python /opt/src/scripts/linear_smoke.py int8"
fi
log "done"
