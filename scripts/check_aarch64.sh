#!/usr/bin/env bash
# Run a device archive on aarch64 (Jetson's CPU architecture) under qemu user emulation:
#   cached Debian arm64 rootfs -> the archive's own README bootstrap (venv, requirements from PyPI's
#   aarch64 wheels, the bundled qwen2edge wheel, `qwen2edge unbundle`) -> `qwen2edge generate --json`.
# The last line printed is generate's JSON object plus "machine": platform.machine() inside ("aarch64").
# What this shows and does not show: docs/jetson.md ("aarch64 under emulation").
#
# usage: sudo scripts/check_aarch64.sh ARCHIVE          (ARCHIVE from `qwen2edge bundle`)
# needs: root, apt-get install debootstrap qemu-user-static binfmt-support; network to Debian and PyPI.
# env:   Q2E_AARCH64_ROOTFS  rootfs cache (default ~/.cache/qwen2edge/aarch64-rootfs-bookworm)
#        DEBIAN_MIRROR       (default http://deb.debian.org/debian)
set -euo pipefail

die() { echo "check_aarch64: $*" >&2; exit 2; }
say() { echo "check_aarch64: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 ARCHIVE.tar.gz (written by \`qwen2edge bundle\`)"
ARCHIVE=$(readlink -f "$1")
[ -f "$ARCHIVE" ] || die "$1 does not exist: pass a file written by \`qwen2edge bundle\`"
[ "$(id -u)" = 0 ] || die "debootstrap, mount and chroot need root: run it as root (sudo $0 $1)"
for tool in debootstrap qemu-aarch64-static chroot flock; do
  command -v "$tool" > /dev/null \
    || die "$tool is missing: apt-get install -y debootstrap qemu-user-static binfmt-support"
done

SUITE=bookworm  # Debian 12: Python 3.11, glibc 2.36 (JetPack 6 is Ubuntu 22.04: Python 3.10, glibc 2.35)
ROOTFS=${Q2E_AARCH64_ROOTFS:-${XDG_CACHE_HOME:-$HOME/.cache}/qwen2edge/aarch64-rootfs-$SUITE}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
T_START=$(date +%s)
mkdir -p "$(dirname "$ROOTFS")"
exec 9> "$ROOTFS.lock"  # one run per rootfs at a time: runs share its /proc and /dev mounts
flock -w 3600 9 || die "another check_aarch64.sh run holds $ROOTFS.lock: wait for it to finish"

# ---- 1. binfmt_misc: let the kernel run aarch64 ELF files through qemu-aarch64-static ----------
BINFMT=/proc/sys/fs/binfmt_misc
[ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT" \
  || die "cannot mount binfmt_misc on $BINFMT (a container without that privilege?): run on a host or VM as root"
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
  if command -v update-binfmts > /dev/null && [ -e /usr/share/binfmts/qemu-aarch64 ]; then
    update-binfmts --import qemu-aarch64 || update-binfmts --enable qemu-aarch64
  fi
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then  # register by hand; F: the kernel opens qemu now, so the chroot needs no copy
  printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:FP' \
    > "$BINFMT/register"
fi
[ "$(head -n 1 "$BINFMT/qemu-aarch64")" = enabled ] \
  || die "qemu-aarch64 is registered but disabled: update-binfmts --enable qemu-aarch64"

# ---- 2. the rootfs, built once (atomically: a .partial directory renamed when complete) ---------
if [ -f "$ROOTFS/.qwen2edge-rootfs-ready" ]; then
  say "rootfs: cached at $ROOTFS"
else
  PARTIAL="$ROOTFS.partial"
  grep -q " $PARTIAL/" /proc/mounts \
    && die "$PARTIAL has mounts left by an interrupted build: umount them, then rm -rf it"
  rm -rf "$PARTIAL"
  say "rootfs: debootstrap $SUITE arm64 into $PARTIAL (under emulation: many minutes; cached afterwards)"
  t0=$(date +%s)
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$SUITE" "$PARTIAL" "$MIRROR" > "$ROOTFS.debootstrap.log" 2>&1 \
    || die "debootstrap failed (last lines of $ROOTFS.debootstrap.log below)$(echo; tail -n 5 "$ROOTFS.debootstrap.log")"
  chroot "$PARTIAL" /usr/bin/python3 -c 'import platform, venv; assert platform.machine() == "aarch64"' \
    || die "the new rootfs's python3 does not run as aarch64: check the qemu-aarch64 binfmt entry"
  touch "$PARTIAL/.qwen2edge-rootfs-ready"
  mv "$PARTIAL" "$ROOTFS"
  say "rootfs: built in $(( $(date +%s) - t0 ))s"
fi

# ---- 3. a fresh run directory inside the rootfs; network and pip settings from the host ----------
RUN=$(mktemp -d "$ROOTFS/tmp/q2e-run-XXXXXX")
RUN_IN=/tmp/$(basename "$RUN")
MOUNTED=()
cleanup() {
  local m
  for m in "${MOUNTED[@]}"; do umount "$m" 2> /dev/null || umount -l "$m" 2> /dev/null || true; done
  rm -rf "$RUN"
}
trap cleanup EXIT
cp "$ARCHIVE" "$RUN/"
NAME=$(basename "$ARCHIVE")
cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# The host's CA bundle (it may hold a proxy's CA that Debian's ca-certificates lacks).
cp -L /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/ssl/certs/qwen2edge-host-ca.crt"
host_pip() { python3 -m pip config get "$1" 2> /dev/null || true; }
http_only() { tr ' ' '\n' | grep -E '^https?://' | tr '\n' ' ' || true; }
# Index URLs travel when they are http(s); file:// indexes and find-links are host paths (x86 wheels).
PIP_INDEX=$(echo "${PIP_INDEX_URL:-$(host_pip global.index-url)}" | http_only)
PIP_EXTRA=$(echo "${PIP_EXTRA_INDEX_URL:-$(host_pip global.extra-index-url)}" | http_only)

# No /sys: onnxruntime's bundled cpuinfo would read this x86-64 host's CPU topology there and segfault
# on `import onnxruntime` under qemu (seen with onnxruntime 1.32.0, qemu 7.2); without it, it warns and
# falls back to generic kernels.
mount -t proc proc "$ROOTFS/proc" && MOUNTED=("$ROOTFS/proc")
mount --bind /dev "$ROOTFS/dev" && MOUNTED=("$ROOTFS/dev" "${MOUNTED[@]}")

# ---- 4. the archive's own instructions: README-device.md's first code block, up to `qwen2edge unbundle`
STEPS=$(tar -xzOf "$ARCHIVE" README-device.md | awk '/^```/{n++; next} n==1' \
  | awk '{print} /^qwen2edge unbundle /{exit}' | sed "s|THIS_FILE\.tar\.gz|$NAME|g")
echo "$STEPS" | grep -q '^qwen2edge unbundle ' \
  || die "$NAME's README-device.md has no \`qwen2edge unbundle\` step: re-run \`qwen2edge bundle\`"
say "running the archive's README steps in the aarch64 chroot:"
echo "$STEPS" | sed 's/^/    /' >&2
cat > "$RUN/run.sh" << EOF
set -euo pipefail
cd $RUN_IN
# PIP_CACHE_DIR lives in the cached rootfs (an index that sends no-store headers leaves it empty).
export HOME=$RUN_IN PIP_CERT=/etc/ssl/certs/qwen2edge-host-ca.crt PIP_CACHE_DIR=/var/cache/qwen2edge-pip
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_DEFAULT_TIMEOUT=180
${PIP_INDEX:+export PIP_INDEX_URL='$PIP_INDEX'}
${PIP_EXTRA:+export PIP_EXTRA_INDEX_URL='$PIP_EXTRA'}
t0=\$(date +%s)
$STEPS
echo "check_aarch64: README steps took \$(( \$(date +%s) - t0 ))s" >&2
python -c 'import sys; assert "torch" not in sys.modules' && ! python -c 'import torch' 2> /dev/null \
  || { echo "check_aarch64: torch is importable in the device venv: the device requirements pulled it in" >&2; exit 1; }
t0=\$(date +%s)
qwen2edge generate model --backend ort --prompt-ids 5,6,7,8,9 --max-new-tokens 12 --temperature 0 --json > generate.json
echo "check_aarch64: generate took \$(( \$(date +%s) - t0 ))s" >&2
python - << 'PY'
import json, platform
lines = [l for l in open("generate.json", encoding="utf-8").read().splitlines() if l.strip()]
out = json.loads(lines[-1])
out["machine"] = platform.machine()
print(json.dumps(out, ensure_ascii=False))
PY
EOF
# env -i: nothing of the host's environment (PYTHONPATH, VIRTUAL_ENV, PIP_*) leaks into the chroot.
env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
  chroot "$ROOTFS" /bin/bash "$RUN_IN/run.sh" > "$RUN/result.txt" \
  || die "the run inside the aarch64 chroot failed (its output is above)"
say "total wall time $(( $(date +%s) - T_START ))s"
tail -n 1 "$RUN/result.txt"
