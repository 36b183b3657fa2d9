#!/usr/bin/env bash
# Build a real Debian guest from Debian's packages: OUT/root.img, a sparse raw disk
# image that boots by itself (extlinux in its MBR and partition, BIOS boot), with
# systemd, Debian's kernel, the QEMU guest agent and a login prompt on the serial
# console. It is laid out as a Qubes AppVM's disks are:
#   vda  root      this image (a template's root; an AppVM's root comes from it)
#   vdb  private   ext4, made on first use, mounted at /home
#   vdc  volatile  swap, made again at each boot (vmtreefs resets it at each start)
# root has no password (the console is the only way in; there is no network).
# OUT/domain.xml is the base description to write to vms/NAME/domain.xml.
#
# Cached: nothing is done when OUT/root.img was built by this same script (its
# sha256 is kept in OUT/stamp). Needs root (loop devices, mount) and Debian's
# mirror (MIRROR=); installs mmdebstrap, extlinux and syslinux-common if missing.
#
# Every failure prints one line "debian-guest: WHAT; WHAT TO DO" (the ERR trap names
# any command that fails without a check of its own).
#
# Usage: scripts/build-debian-guest.sh [OUT]   (default build/debian; SIZE=2G SUITE=bookworm)
set -Eeuo pipefail
trap 'echo "debian-guest: failed (exit $?): $BASH_COMMAND (line $LINENO); see its output above, fix that and run it again" >&2' ERR

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
OUT=${1:-build/debian}
SIZE=${SIZE:-2G}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
LABEL=vmtree-root

fail() { echo "debian-guest: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (loop devices and a mount); run it as root"
mkdir -p "$OUT" || fail "cannot make $OUT; set OUT to a directory you can write"
OUT=$(readlink -f "$OUT")
STAMP="$(sha256sum "$SCRIPT" | cut -d' ' -f1) $SUITE $SIZE"
if [ -f "$OUT/root.img" ] && [ "$(cat "$OUT/stamp" 2>/dev/null)" = "$STAMP" ]; then
  echo "debian-guest: $OUT/root.img is up to date"
  exit 0
fi

missing=()
for tool in mmdebstrap:mmdebstrap extlinux:extlinux sfdisk:fdisk mkfs.ext4:e2fsprogs losetup:mount; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
[ -f /usr/lib/syslinux/mbr/mbr.bin ] || missing+=(syslinux-common)
if [ ${#missing[@]} -gt 0 ]; then
  echo "debian-guest: apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" \
    || fail "apt-get install ${missing[*]} failed (see above); install them and run it again"
fi

WORK=$(mktemp -d "$OUT/work.XXXXXX")
LOOP=""
cleanup() {
  if mountpoint -q "$WORK/mnt" 2>/dev/null; then umount "$WORK/mnt" || true; fi
  if [ -n "$LOOP" ]; then losetup -d "$LOOP" || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# What the guest runs at each boot: the private volume formatted on first use and
# mounted at /home, the volatile one made swap (it comes back empty at each start).
cat > "$WORK/vmtree-volumes" <<'EOF'
#!/bin/sh
set -e
if [ -b /dev/vdb ]; then
  blkid /dev/vdb >/dev/null 2>&1 || mkfs.ext4 -q -L vmtree-private /dev/vdb
  mountpoint -q /home || mount /dev/vdb /home
fi
if [ -b /dev/vdc ]; then
  mkswap -L vmtree-volatile /dev/vdc >/dev/null
  swapon /dev/vdc
fi
EOF
cat > "$WORK/vmtree-volumes.service" <<'EOF'
[Unit]
Description=vmtreefs volumes: private at /home, volatile as swap
DefaultDependencies=no
After=local-fs.target
Before=systemd-user-sessions.service getty.target
ConditionVirtualization=vm

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/vmtree-volumes

[Install]
WantedBy=multi-user.target
EOF

# dbus: without it systemd-logind does not run, and the ACPI power button (libvirt's
# shutdown) does nothing.
echo "debian-guest: mmdebstrap $SUITE from $MIRROR (a few minutes)"
mmdebstrap --variant=minbase --mode=root \
  --include=systemd-sysv,dbus,udev,linux-image-amd64,qemu-guest-agent,e2fsprogs,util-linux,kmod,procps,login,passwd \
  --customize-hook="echo vmtree-debian > \"\$1/etc/hostname\"" \
  --customize-hook="echo 'LABEL=$LABEL / ext4 errors=remount-ro 0 1' > \"\$1/etc/fstab\"" \
  --customize-hook="chroot \"\$1\" passwd -d root" \
  --customize-hook="install -m 0755 '$WORK/vmtree-volumes' \"\$1/usr/local/sbin/vmtree-volumes\"" \
  --customize-hook="install -m 0644 '$WORK/vmtree-volumes.service' \"\$1/etc/systemd/system/\"" \
  --customize-hook="chroot \"\$1\" systemctl enable vmtree-volumes.service" \
  --customize-hook="rm -rf \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/cache/apt/*" \
  "$SUITE" "$WORK/rootfs.tar" "$MIRROR" \
  || fail "mmdebstrap failed (see above); check that $MIRROR answers (MIRROR= another one)"

echo "debian-guest: a $SIZE sparse image with one bootable partition"
truncate -s "$SIZE" "$WORK/root.img"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$WORK/root.img"
# A loop device over the partition alone: no partition device nodes to wait for.
LOOP=$(losetup --show -f --offset $((2048 * 512)) "$WORK/root.img")
# extlinux 6.04 boots ext4, but not with the 64bit feature.
mkfs.ext4 -q -L "$LABEL" -O ^64bit "$LOOP"
mkdir "$WORK/mnt"
mount "$LOOP" "$WORK/mnt"
tar -xpf "$WORK/rootfs.tar" -C "$WORK/mnt" --numeric-owner
mkdir -p "$WORK/mnt/boot/extlinux"
extlinux --install "$WORK/mnt/boot/extlinux" >/dev/null
# Debian keeps /vmlinuz and /initrd.img pointing at the newest kernel; extlinux
# follows them, so a kernel upgrade inside the guest needs no change here.
cat > "$WORK/mnt/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND root=LABEL=$LABEL ro console=ttyS0,115200
EOF
umount "$WORK/mnt"
losetup -d "$LOOP"
LOOP=""
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$WORK/root.img" bs=440 count=1 conv=notrunc status=none

# The base description for vms/NAME/domain.xml: boot from the disk itself, and a
# channel for the guest agent. vmtreefs adds the name, memory, disks and console.
cat > "$OUT/domain.xml" <<'XML'
<domain type='qemu'>
  <os>
    <type arch='x86_64'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
  </devices>
</domain>
XML
mv "$WORK/root.img" "$OUT/root.img"
echo "$STAMP" > "$OUT/stamp"
echo "debian-guest: $OUT/root.img ($SIZE, $(du -h "$OUT/root.img" | cut -f1) allocated)"
