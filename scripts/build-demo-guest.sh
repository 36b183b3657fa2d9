#!/usr/bin/env bash
# Build the demo guest: Debian's kernel and an initramfs of busybox-static whose
# /init proves a VM really runs and really keeps its private volume:
#
#   - prints "VMTREE-BOOT N", "VMTREE-ROOT TAG" (the letters and digits the root disk
#     starts with) and "VMTREE-READY" on the serial console, where N is a
#     boot counter kept in the first 32 bytes of the private volume (the second
#     virtio disk, /dev/vdb; the cmdline "vmtree.private=vdX" names another), and
#     synced there before READY;
#   - then "VMTREE-TICK N" once a second, until the ACPI power button is pressed
#     (libvirt's virDomainShutdown by default, QEMU's system_powerdown): then it prints
#     "VMTREE-SHUTDOWN", syncs and powers off, so QEMU exits by itself. The button's
#     /dev/input/eventN (named "Power Button" in sysfs) is opened before READY, so a
#     press right after READY is not lost; "VMTREE-NO-POWER-BUTTON" if there is none.
#
# Usage: scripts/build-demo-guest.sh OUTDIR
#   OUTDIR gets vmlinuz and initrd.img (mode 0644: libvirt's qemu user reads them).
# Needs: linux-image-amd64 (kernel and its virtio, ACPI button and evdev modules),
# busybox-static, kmod, cpio, gzip (scripts/guest-deps.sh installs them).
#
# Every failure prints one line "build-demo-guest: WHAT; WHAT TO DO" (the ERR
# trap names any command that fails without a check of its own).
set -Eeuo pipefail
trap 'echo "build-demo-guest: failed (exit $?): $BASH_COMMAND (line $LINENO); make deps-guest installs what this needs" >&2' ERR

die() {
  echo "build-demo-guest: $*" >&2
  exit 1
}

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
out=$1
kernel=$(find /boot -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null | sort -V | tail -n 1)
[ -n "$kernel" ] || die "no /boot/vmlinuz-*; install linux-image-amd64 (make deps-guest)"
[ -r "$kernel" ] || die "$kernel is not readable; run as root"
kver=${kernel#/boot/vmlinuz-}
[ -d "/lib/modules/$kver" ] || die "no /lib/modules/$kver for $kernel; reinstall linux-image-$kver"
for tool in modprobe cpio gzip; do
  command -v "$tool" >/dev/null || die "$tool is missing; install it (make deps-guest)"
done
busybox=$(command -v busybox || true)
# ldd fails on a static binary: a dynamic busybox cannot run in the initramfs.
if [ -z "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  die "no static busybox; install busybox-static (make deps-guest)"
fi

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,modules}
cp "$busybox" "$root/bin/busybox"

# Virtio is modular in Debian's kernel: the PCI transport and the block driver, and so
# are the ACPI power button and its /dev/input/event* interface (evdev); with their
# dependencies in load order (modprobe resolves them), listed for /init. A module built
# into the kernel shows as "builtin NAME", not "insmod PATH", and is skipped.
: >"$root/modules/order"
for module in virtio_pci virtio_blk button evdev; do
  deps=$(modprobe --show-depends -S "$kver" "$module" 2>&1) \
    || die "kernel $kver has no module $module: $deps"
  while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    name=$(basename "$path")
    name=${name%%.ko*}
    grep -qx "$name" "$root/modules/order" && continue
    case "$path" in
      *.ko.xz) xz -dc "$path" >"$root/modules/$name.ko" || die "cannot unpack $path; install xz-utils" ;;
      *.ko.zst) zstd -qdc "$path" >"$root/modules/$name.ko" || die "cannot unpack $path; install zstd" ;;
      *) cp "$path" "$root/modules/$name.ko" ;;
    esac
    echo "$name" >>"$root/modules/order"
  done <<<"$deps"
done

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
exec >/dev/ttyS0 2>&1 </dev/null
for module in $(cat /modules/order); do
  insmod "/modules/$module.ko" || echo "VMTREE-INSMOD-FAILED $module"
done
private=vdb
for word in $(cat /proc/cmdline); do
  case "$word" in vmtree.private=*) private=${word#vmtree.private=} ;; esac
done
n=0
for _ in $(seq 50); do [ -b "/dev/$private" ] && break; sleep 0.1; done
if [ -b "/dev/$private" ]; then
  n=$(head -c 32 "/dev/$private" | tr -dc 0-9)
  n=$(( ${n:-0} + 1 ))
  printf '%-31s\n' "$n" | dd of="/dev/$private" bs=32 count=1 conv=notrunc,fsync 2>/dev/null
else
  echo "VMTREE-NO-PRIVATE /dev/$private"
fi
echo "VMTREE-BOOT $n"
# What the root disk (the first, /dev/vda, when there is another) starts with, so a test
# sees which template version a VM booted from.
root_tag=none
[ "$private" != vda ] && [ -b /dev/vda ] && root_tag=$(head -c 32 /dev/vda | tr -dc 'A-Za-z0-9_-')
echo "VMTREE-ROOT ${root_tag:-none}"
# The power button: each "Power Button" event device is opened here, before READY (an
# evdev client queues the events that come after it opens), and a background job waits
# for its first event (24 bytes: one struct input_event) to shut down.
shut_down() {
  echo "VMTREE-SHUTDOWN"
  sync
  poweroff -f
}
buttons=0
for _ in $(seq 50); do
  for name in /sys/class/input/event*/device/name; do
    [ "$(cat "$name" 2>/dev/null)" = "Power Button" ] || continue
    event=${name%/device/name}
    event=/dev/input/${event##*/}
    fd=$((3 + buttons))
    [ "$fd" -le 9 ] || break
    # Tried in a subshell first: a failed redirection of exec would end this shell.
    [ -c "$event" ] && (exec <"$event") 2>/dev/null || continue
    eval "exec $fd<$event"
    buttons=$((buttons + 1))
    (
      if eval "dd bs=24 count=1 of=/dev/null <&$fd" 2>/dev/null; then
        shut_down
      else
        echo "VMTREE-POWER-BUTTON-FAILED $event"
      fi
    ) &
  done
  [ "$buttons" -gt 0 ] && break
  sleep 0.1
done
[ "$buttons" -gt 0 ] || echo "VMTREE-NO-POWER-BUTTON"
echo "VMTREE-READY"
tick=0
while true; do
  tick=$((tick + 1))
  echo "VMTREE-TICK $tick"
  sleep 1
done
EOF
chmod 0755 "$root/init"

mkdir -p "$out" || die "cannot make $out"
(cd "$root" && find . | cpio --quiet -o -H newc | gzip -9) >"$out/initrd.img.tmp"
cp "$kernel" "$out/vmlinuz.tmp"
chmod 0644 "$out/initrd.img.tmp" "$out/vmlinuz.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "demo guest: $out/vmlinuz ($kver), $out/initrd.img"
