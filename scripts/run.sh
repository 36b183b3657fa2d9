#!/usr/bin/env bash
# `make run`: mount STATE at MNT in the foreground, with a bootable demo VM.
#
#   - builds the demo guest into GUEST (once; scripts/build-demo-guest.sh);
#   - starts virtlogd and libvirtd unless they run, and stops on exit only those
#     it started (scripts/libvirt-daemons.sh, by pid);
#   - once the mount answers, makes the VM `demo` in an empty tree;
#   - mounts with -o guest=GUEST, so a new VM boots the demo guest.
#
# QEMU runs as libvirt-qemu under qemu:///system: STATE and GUEST must be
# reachable by that user (not under a 0700 home directory); this is checked
# first, with the way out printed.
#
# Usage: scripts/run.sh VMTREEFS STATE MNT GUEST
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
vmtreefs=${1:?usage: $0 VMTREEFS STATE MNT GUEST}
state=$(readlink -f "${2:?}")
mnt=${3:?}
guest=$(readlink -f "${4:?}")

mkdir -p "$state" "$mnt" "$guest" || {
  echo "run: cannot use $mnt; a stale mount? try: fusermount3 -u -z $mnt" >&2
  exit 1
}
for dir in "$state" "$guest"; do
  if id libvirt-qemu >/dev/null 2>&1 && ! runuser -u libvirt-qemu -- test -x "$dir"; then
    echo "run: $dir is not reachable by the libvirt-qemu user that runs QEMU" >&2
    echo "run: use a place under /var/lib or /srv, e.g. make run STATE=/var/lib/vmtreefs/state" >&2
    exit 1
  fi
done

if [ ! -e "$guest/vmlinuz" ] || [ ! -e "$guest/initrd.img" ]; then
  bash scripts/build-demo-guest.sh "$guest"
fi

pidfile="$(dirname "$guest")/libvirt-started.pids"
bash scripts/libvirt-daemons.sh start "$pidfile"
trap 'bash scripts/libvirt-daemons.sh stop "$pidfile"' EXIT

# Once the mount answers, an empty tree gets a demo VM (in the background: the
# mount itself stays in the foreground).
(
  for _ in $(seq 600); do
    if [ -e "$mnt/.vmtree/status" ]; then
      if [ -z "$(ls "$mnt")" ]; then
        mkdir "$mnt/demo" && echo "run: made the demo VM $mnt/demo; start it with: echo start > $mnt/demo/ctl"
      fi
      break
    fi
    sleep 0.2
  done
) &
"$vmtreefs" mount "$state" "$mnt" -f -o "guest=$guest"
