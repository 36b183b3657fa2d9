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
# busybox-static, kmod, cpio, gzip.
set -euo pipefail

out=${1:?usage: $0 OUTDIR}
kernel=$(ls /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
if [ -z "$kernel" ]; then
  echo "build-demo-guest: no /boot/vmlinuz-*: install linux-image-amd64 (make deps-guest)" >&2
  exit 1
fi
kver=${kernel#/boot/vmlinuz-}
busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ! file -L "$busybox" | grep -q "statically linked"; then
  echo "build-demo-guest: no static busybox: install busybox-static (make deps-guest)" >&2
  exit 1
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
  modprobe --show-depends -S "$kver" "$module" | while read -r verb path _; do
    [ "$verb" = insmod ] || continue
    name=$(basename "$path")
    name=${name%%.ko*}
    grep -qx "$name" "$root/modules/order" && continue
    case "$path" in
      *.ko.xz) xz -dc "$path" >"$root/modules/$name.ko" ;;
      *.ko.zst) zstd -qdc "$path" >"$root/modules/$name.ko" ;;
      *) cp "$path" "$root/modules/$name.ko" ;;
    esac
    echo "$name" >>"$root/modules/order"
  done
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

mkdir -p "$out"
(cd "$root" && find . | cpio --quiet -o -H newc | gzip -9) >"$out/initrd.img.tmp"
cp "$kernel" "$out/vmlinuz.tmp"
chmod 0644 "$out/initrd.img.tmp" "$out/vmlinuz.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "demo guest: $out/vmlinuz ($kver), $out/initrd.img"
