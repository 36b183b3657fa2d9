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
# Every way this can fail prints one line "run: WHAT FAILED; WHAT TO DO" on
# stderr: the checks below say it themselves, and anything else that fails is
# named by the ERR trap, so `set -e` never ends the script without a word.
# Ctrl-C (SIGINT to the process group) unmounts and exits 0.
#
# Usage: scripts/run.sh VMTREEFS STATE MNT GUEST
set -Eeuo pipefail

here="$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")"
cd "$here/.."
trap 'echo "run: failed (exit $?): $BASH_COMMAND (scripts/run.sh line $LINENO); fix that and run make run again" >&2' ERR

die() {
  echo "run: $*" >&2
  exit 1
}

[ $# -eq 4 ] || die "usage: $0 VMTREEFS STATE MNT GUEST"
vmtreefs=$1
[ -x "$vmtreefs" ] || die "$vmtreefs is missing; make the venv first: make venv"

# Each directory is made before its path is resolved: `readlink -f` fails on a
# path whose parent does not exist yet (build/ on a fresh clone).
make_dir() {
  local dir=$1 what=$2 err
  if ! err=$(mkdir -p -- "$dir" 2>&1); then
    die "cannot make the $what directory $dir: ${err#mkdir: }"
  fi
}
make_dir "$2" state
make_dir "$4" "demo guest"
if err=$(stat -- "$3" 2>&1 >/dev/null) || [[ $err != *"not connected"* ]]; then
  make_dir "$3" "mount point"
else
  die "$3 is the mount of a daemon that died; unmount it: fusermount3 -u -z $3"
fi
state=$(readlink -f -- "$2")
mnt=$3
guest=$(readlink -f -- "$4")
if mountpoint -q -- "$mnt"; then
  die "$mnt is mounted already (another make run?); stop that one first: .venv/bin/vmtreefs umount $mnt"
fi

if id libvirt-qemu >/dev/null 2>&1; then
  if ! runuser -u libvirt-qemu -- test -x "$state"; then
    die "$state is not reachable by the libvirt-qemu user that runs QEMU; use a place under /var/lib or /srv, e.g. make run STATE=/var/lib/vmtreefs/state"
  fi
  if ! runuser -u libvirt-qemu -- test -x "$guest"; then
    die "$guest is not reachable by the libvirt-qemu user that runs QEMU; use a place under /var/lib or /srv, e.g. make run BUILD=/var/lib/vmtreefs/build"
  fi
fi

if [ ! -e "$guest/vmlinuz" ] || [ ! -e "$guest/initrd.img" ]; then
  bash scripts/build-demo-guest.sh "$guest" \
    || die "building the demo guest into $guest failed (see above); make deps-guest installs what it needs"
fi

pidfile="$(dirname "$guest")/libvirt-started.pids"
bash scripts/libvirt-daemons.sh start "$pidfile" \
  || die "libvirt does not run (see above); look at /var/log/libvirt, or run: bash scripts/libvirt-daemons.sh start $pidfile"
trap 'bash scripts/libvirt-daemons.sh stop "$pidfile"' EXIT

# Once the mount answers, an empty tree gets a demo VM (in the background: the
# mount itself stays in the foreground).
(
  trap - ERR
  for _ in $(seq 600); do
    if [ -e "$mnt/.vmtree/status" ]; then
      if [ -z "$(ls "$mnt")" ]; then
        if mkdir "$mnt/demo"; then
          echo "run: made the demo VM $mnt/demo; start it with: echo start > $mnt/demo/ctl"
        else
          echo "run: could not make the demo VM $mnt/demo (see above); the last lines of $mnt/.vmtree/events say why" >&2
        fi
      fi
      exit 0
    fi
    sleep 0.2
  done
  echo "run: the mount at $mnt did not answer within 120 s; no demo VM made (see the daemon's log above)" >&2
) &
waiter=$!
# The waiter ignores SIGINT (a background job of a script does): end it with us.
trap 'kill "$waiter" 2>/dev/null || true; bash scripts/libvirt-daemons.sh stop "$pidfile"' EXIT

status=0
"$vmtreefs" mount "$state" "$mnt" -f -o "guest=$guest" || status=$?
case $status in
  0) ;;
  130) echo "run: interrupted" >&2 ;;
  *) die "vmtreefs mount $state $mnt exited with status $status (its reason is above)" ;;
esac
