#!/usr/bin/env bash
# Install what the dm-thin guest tests need, idempotently:
#   - Debian packages: a Debian kernel (the guest boots it), QEMU, and the
#     device-mapper / thin-pool tools the guest runs (they come from the host's
#     root, which the guest sees read-only over 9p);
#   - virtme-ng from PyPI into the project's venv (the `vng` launcher).
# apt-get runs only when a package is missing; pip only when .venv/bin/vng is.
#
# Every failure prints one line "guest-deps: WHAT; WHAT TO DO" (the ERR trap names
# any command that fails without a check of its own, e.g. apt-get or pip).
#
# Usage: scripts/guest-deps.sh            (from anywhere; VENV=path overrides .venv)
set -Eeuo pipefail
trap 'echo "guest-deps: failed (exit $?): $BASH_COMMAND (line $LINENO); see its output above, fix that and run it again" >&2' ERR

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

VENV=${VENV:-.venv}

# linux-image-amd64     the guest kernel with its modules (dm-thin-pool, fuse,
#                       loop, 9p, virtio) in /boot and /lib/modules
# qemu-system-x86       the VM itself (virtme-ng runs qemu-system-x86_64)
# busybox-static        virtme-ng builds the guest's initramfs from it
# kmod                  modprobe/depmod: virtme-ng resolves the modules the
#                       initramfs needs (linux-image pulls it in as well)
# lvm2                  dmsetup (and lvm) inside the guest
# thin-provisioning-tools  thin_check, thin_ls, thin_delta, thin_metadata_size
# xfsprogs e2fsprogs util-linux  mkfs.xfs / mkfs.ext4 / losetup in the guest
# fuse3                 fusermount3 for FUSE mounts in the guest
# cpio                  the demo guest's initramfs (scripts/build-demo-guest.sh)
# qemu-utils and udev are not needed: vng shares the host root over 9p
# (Debian 12 has no virtiofsd package) and its init makes /dev nodes itself.
PACKAGES=(linux-image-amd64 qemu-system-x86 busybox-static kmod lvm2
          thin-provisioning-tools xfsprogs e2fsprogs util-linux fuse3 cpio)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=sudo
  fi
fi

missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  case "$status" in
    *" ok installed") ;;
    *) missing+=("$p") ;;
  esac
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "guest-deps: all Debian packages present"
else
  if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
    echo "guest-deps: missing: ${missing[*]}; run as root or install sudo" >&2
    exit 1
  fi
  echo "guest-deps: installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
  # --no-install-recommends: the kernel would otherwise pull firmware and
  # apparmor, QEMU a graphical stack; none of it is needed by a serial guest.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${missing[@]}"
fi

# A kernel that vng can boot must now be in /boot, and readable (Debian's are 0644).
if ! compgen -G '/boot/vmlinuz-*' >/dev/null; then
  echo "guest-deps: no /boot/vmlinuz-* after installing linux-image-amd64" >&2
  exit 1
fi

if [ -x "$VENV/bin/vng" ]; then
  echo "guest-deps: $VENV/bin/vng present"
else
  if [ ! -x "$VENV/bin/pip" ]; then
    echo "guest-deps: no $VENV/bin/pip; make the venv first (make venv)" >&2
    exit 1
  fi
  echo "guest-deps: pip install virtme-ng into $VENV"
  "$VENV/bin/pip" install --disable-pip-version-check --no-input virtme-ng
fi
