"""The guest harness itself: dm-thin end to end, FUSE, and pytest run inside the guest.

These prove the mechanism the dm-thin engine's contract tests build on; each
boots its own guest (about 15 s to the script under TCG here, more when the
machine is busy).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.guest import GuestError, GuestRunner, run_in_guest, run_pytest

MiB = 1 << 20

# A thin pool on two sparse loop files; a thin volume with ext4 and 8 MiB of data;
# a snapshot taken with the origin suspended; the snapshot keeps the old data
# after the origin is overwritten; thin_ls and thin_delta read a reserved
# metadata snapshot of the live pool; delete; teardown; thin_check the metadata.
# Names carry the shell's pid so that a native run cannot meet another's devices.
SMOKE_SCRIPT = r"""
set -euo pipefail
W=$(mktemp -d /tmp/vmtree-thin.XXXXXX)
P=vmtree-smoke-$$
DATA= META=
cleanup() {
  set +e
  mountpoint -q "$W/snap" && umount "$W/snap"
  mountpoint -q "$W/origin" && umount "$W/origin"
  for d in $P-snap $P-origin $P-pool; do
    dmsetup info "$d" >/dev/null 2>&1 && dmsetup remove "$d"
  done
  [ -n "$DATA" ] && losetup -d "$DATA" 2>/dev/null
  [ -n "$META" ] && losetup -d "$META" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT

echo "CHECK dmsetup: $(dmsetup version | tr '\n' ' ')"
echo "CHECK thin tools: $(thin_check -V)"
echo "CHECK dm-thin target: $(dmsetup targets | grep -E '^thin-pool ' | tr -s ' ')"

BLOCK=128                                  # 64 KiB pool blocks, in sectors
need=$(thin_metadata_size -b 64k -s 1g -m 16 -u k -n)
META_KIB=$(( need > 16384 ? need : 16384 ))
echo "CHECK metadata: thin_metadata_size says ${need} KiB, using ${META_KIB} KiB"
truncate -s 1G "$W/data.img"
truncate -s "${META_KIB}K" "$W/meta.img"
DATA=$(losetup -f --show "$W/data.img")
META=$(losetup -f --show "$W/meta.img")
echo "CHECK loops: data=$DATA meta=$META"

DATA_SECTORS=$(blockdev --getsz "$DATA")
dmsetup create $P-pool --table "0 $DATA_SECTORS thin-pool $META $DATA $BLOCK 0 1 skip_block_zeroing"
dmsetup message $P-pool 0 "create_thin 0"
VOL_SECTORS=$(( 256 * 2048 ))              # 256 MiB, thin
dmsetup create $P-origin --table "0 $VOL_SECTORS thin /dev/mapper/$P-pool 0"
mkfs.ext4 -q -F /dev/mapper/$P-origin
mkdir "$W/origin" "$W/snap"
mount /dev/mapper/$P-origin "$W/origin"
dd if=/dev/urandom of="$W/origin/data" bs=1M count=8 status=none
sync
before=$(sha256sum < "$W/origin/data")

# A snapshot of an active origin: suspend it (this freezes ext4) around create_snap.
dmsetup suspend $P-origin
dmsetup message $P-pool 0 "create_snap 1 0"
dmsetup resume $P-origin
dmsetup create $P-snap --table "0 $VOL_SECTORS thin /dev/mapper/$P-pool 1"
mount -o ro,noload /dev/mapper/$P-snap "$W/snap"
[ "$(sha256sum < "$W/snap/data")" = "$before" ]
echo "CHECK snapshot has the origin's data"

dd if=/dev/urandom of="$W/origin/data" bs=1M count=8 conv=notrunc status=none
sync
[ "$(sha256sum < "$W/origin/data")" != "$before" ]
[ "$(sha256sum < "$W/snap/data")" = "$before" ]
echo "CHECK snapshot kept its data after the origin was overwritten"
echo "CHECK pool status: $(dmsetup status $P-pool)"

dmsetup message $P-pool 0 reserve_metadata_snap
echo "--- thin_ls"
thin_ls --metadata-snap -o DEV,MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES "$META" | tee "$W/ls"
echo "--- thin_delta"
thin_delta --metadata-snap --snap1 0 --snap2 1 "$META" | tee "$W/delta"
dmsetup message $P-pool 0 release_metadata_snap
[ "$(awk '$1 == "0" || $1 == "1"' "$W/ls" | wc -l)" = 2 ]
grep -q '<different ' "$W/delta"
echo "CHECK thin_ls lists devices 0 and 1, thin_delta shows the overwritten blocks"

umount "$W/snap"
dmsetup remove $P-snap
dmsetup message $P-pool 0 "delete 1"
umount "$W/origin"
dmsetup remove $P-origin
dmsetup remove $P-pool
losetup -d "$DATA"; DATA=
losetup -d "$META"; META=
devs=$(dmsetup ls | grep -c "$P" || true)
echo "CHECK torn down: $devs devices, $(losetup -j "$W/data.img" | wc -l) loops"

# The thin tools open with O_DIRECT, which the guest's /tmp (tmpfs under an
# overlay) refuses with EINVAL: give them the metadata file as a loop device.
META=$(losetup -f --show "$W/meta.img")
thin_check "$META"
echo "CHECK thin_check passed"
left=$(thin_ls --no-headers -o DEV "$META" | tr -s ' \n' ' ')
losetup -d "$META"; META=
echo "CHECK devices left after delete 1: $left"
[ "$left" = "0 " ] || [ "$left" = " 0 " ]
echo "SMOKE OK"
"""


def test_dmthin_smoke(guest: GuestRunner) -> None:
    result = guest(SMOKE_SCRIPT, timeout=600)
    out = result.script_output
    assert result.returncode == 0, f"smoke script failed (log {result.log_path}):\n{out}"
    for line in (
        "CHECK snapshot has the origin's data",
        "CHECK snapshot kept its data after the origin was overwritten",
        "CHECK thin_ls lists devices 0 and 1",
        "CHECK torn down: 0 devices, 0 loops",
        "CHECK thin_check passed",
        "SMOKE OK",
    ):
        assert line in out, f"{line!r} missing (log {result.log_path}):\n{out}"
    # The snapshot shares the ext4 metadata it has not rewritten with the origin.
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3)), int(m.group(4)))
        for m in re.finditer(r"^\s*([01])\s+(\d+)\s+(\d+)\s+(\d+)\s*$", out, re.MULTILINE)
    }
    assert set(rows) == {"0", "1"}, out
    for mapped, exclusive, shared in rows.values():
        assert mapped == exclusive + shared
        assert exclusive >= 8 * MiB  # the 8 MiB overwritten in the origin, old and new
        assert shared > 0


def test_fuse_in_guest(guest: GuestRunner) -> None:
    """Our own filesystem, reflink engine on an XFS loop image, mounted and used there."""
    script = r"""
set -euo pipefail
W=$(mktemp -d /tmp/vmtree-fuse.XXXXXX)
cleanup() {
  set +e
  mountpoint -q "$W/x/vms" && vmtreefs umount "$W/x/vms"
  mountpoint -q "$W/x" && umount "$W/x"
  rm -rf "$W"
}
trap cleanup EXIT
ls -l /dev/fuse
truncate -s 512M "$W/xfs.img"
mkfs.xfs -q -m reflink=1 "$W/xfs.img"
mkdir "$W/x"
mount -o loop "$W/xfs.img" "$W/x"
mkdir "$W/x/source" "$W/x/vms"
# engine=reflink: in a guest, auto would pick dm-thin.
vmtreefs mount -o engine=reflink "$W/x/source" "$W/x/vms"
grep -E '^engine' "$W/x/vms/.vmtree/status"
mkdir "$W/x/vms/demo"
echo "LISTING: $(ls "$W/x/vms")"
vmtreefs umount "$W/x/vms"
mountpoint -q "$W/x/vms" && exit 1
umount "$W/x"
echo "LOOPS LEFT: $(losetup -j "$W/xfs.img" | wc -l)"
echo "FUSE OK"
"""
    result = guest(script, timeout=600)
    out = result.script_output
    assert result.returncode == 0, f"FUSE script failed (log {result.log_path}):\n{out}"
    assert "LISTING: demo" in out, out
    assert "engine: reflink" in out, out
    assert "LOOPS LEFT: 0" in out, out
    assert "FUSE OK" in out, out


IN_GUEST_TESTS = "tests/engine/test_fiemap.py"
"""Quick (1-2 s natively, XFS images on loop devices) and the same wherever dm-thin is:
tests/engine/test_select.py expects auto to pick reflink, which a guest with dm-thin fails."""


def test_pytest_in_guest(guest: GuestRunner, shared_dir: Path) -> None:
    """The project's own pytest, run inside the guest, reporting through an --rwdir."""
    report = run_pytest(
        ["-q", IN_GUEST_TESTS],
        results_dir=shared_dir,
        native=guest.native,
        timeout=900,
        log_path=guest.log_dir / "pytest-in-guest.log",
    )
    out = report.result.script_output
    assert report.tests > 0, out
    assert (report.failures, report.errors) == (0, 0), out
    assert report.result.returncode == 0, out
    assert re.search(r"\b\d+ passed\b", out), out
    assert report.ok


def test_boot_failure_raises_with_console_log(guest: GuestRunner, tmp_path: Path) -> None:
    """A guest that cannot boot is an error carrying its console, never a skip or a pass."""
    if guest.native:
        pytest.skip("scripts run natively here: no guest to fail")
    log = tmp_path / "bad-kernel.log"
    with pytest.raises(GuestError) as info:
        run_in_guest("echo unreachable", kernel=Path("/bin/true"), timeout=120, log_path=log)
    assert "never started the script" in str(info.value)
    assert "PVH ELF Note" in info.value.log  # QEMU's own words, from the console log
    assert info.value.log_path == log and "PVH ELF Note" in log.read_text()
