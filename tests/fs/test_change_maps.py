"""Changed-block maps through the mount, as a backup tool reads them:
``volumes/VOL.changes/OTHER`` lists ``OFFSET LENGTH`` lines; copying OTHER's volume,
resizing it to this one's size and writing just those ranges from this volume must
give this volume byte for byte. On both engines (dm-thin in the guest)."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.helpers.changes import rebuild
from tests.helpers.tree import Tree, ctl, error_of, listing
from vmtreefs.engine.select import dmthin_available
from vmtreefs.rules import blockmap

KiB = 1024
MiB = 1024 * KiB
SPAN = 12 * MiB  # writes land in the first SPAN bytes of data.img (16 MiB, then 20)


def volume(vms: Path, vm: str, name: str = "data") -> Path:
    return vms / vm / "volumes" / f"{name}.img"


def scribble(path: Path, rng: random.Random, writes: int) -> int:
    total = 0
    with open(path, "r+b") as f:
        for _ in range(writes):
            length = rng.choice([1, 4 * KiB, rng.randrange(1, 128 * KiB)])
            f.seek(rng.randrange(0, SPAN - length))
            f.write(rng.randbytes(length))
            total += length
    return total


INCREMENT = r"""
cp --sparse=always "$OLDER" "$TARGET"
truncate -s "$(stat -c %s "$NEWER")" "$TARGET"
while read -r offset length; do
    dd if="$NEWER" of="$TARGET" bs=1M conv=notrunc status=none \
       iflag=skip_bytes,count_bytes oflag=seek_bytes \
       skip="$offset" seek="$offset" count="$length"
done < "$CHANGES"
"""
"""The loop of docs/backup.md, as a user runs it."""


def apply_map(newer: Path, older: Path, changes: Path, target: Path) -> int:
    """An incremental backup with shell tools (docs/backup.md); returns the bytes mapped."""
    env = {**os.environ, "NEWER": str(newer), "OLDER": str(older), "TARGET": str(target)}
    env["CHANGES"] = str(changes)
    subprocess.run(["bash", "-euc", INCREMENT], env=env, check=True, timeout=120)
    return sum(length for _, length in blockmap.parse(changes.read_text()))


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.parametrize(
    "engine", [pytest.param("reflink", id="reflink"), pytest.param("dm-thin", id="dmthin")]
)
def test_an_incremental_backup_from_the_change_map(
    workdir: Path, tmp_path: Path, engine: str
) -> None:
    if engine == "dm-thin" and not dmthin_available()[0]:
        pytest.skip("no dm-thin in this kernel; tests/dmthin runs this in a guest")
    tree = Tree(workdir)
    vms = tree.mount([f"engine={engine}", "size=1G"])
    try:
        rng = random.Random(20261126)
        os.mkdir(vms / "work")
        volume(vms, "work").write_bytes(b"")  # a small disk of its own, so copies are quick
        os.truncate(volume(vms, "work"), 16 * MiB)
        scribble(volume(vms, "work"), rng, 20)
        os.setxattr(vms / "work", "user.vmtree.preserve_history", b"1")  # backups keep v1
        os.setxattr(vms / "work", "user.vmtree.versioned", b"1")  # work-next, work-v1
        assert "data.changes" in listing(vms / "work-v1" / "volumes")
        assert (vms / "work-next" / "volumes" / "data.changes" / "work-v1").read_text() == ""

        written = scribble(volume(vms, "work-next"), rng, 15)
        os.truncate(volume(vms, "work-next"), 20 * MiB)  # grown since the last backup
        with open(volume(vms, "work-next"), "r+b") as f:
            f.seek(18 * MiB)
            f.write(b"beyond v1's end")
        assert ctl(vms, "work-next", "commit") == "work-v2"
        changes = vms / "work-v2" / "volumes" / "data.changes" / "work-v1"
        restored = tmp_path / "restored"
        copied = apply_map(volume(vms, "work-v2"), volume(vms, "work-v1"), changes, restored)
        assert digest(restored) == digest(volume(vms, "work-v2"))
        assert 0 < copied <= written + 16 * 2 * 64 * KiB + 64 * KiB, copied
        # The alias names the newest version: "changes since the last backup" reads the same.
        alias = vms / "work" / "volumes" / "data.changes" / "work-v1"
        assert alias.read_text() == changes.read_text()

        # Against a clone written since, both ways, and against the live head.
        os.mkdir(vms / "work-v2" / "clones" / "fork")
        scribble(volume(vms, "fork"), rng, 6)
        scribble(volume(vms, "work-next"), rng, 6)
        for newer, older in [("fork", "work-next"), ("work-next", "fork"), ("fork", "work-v1")]:
            # In memory: quicker than a dd per range in the slow guest.
            ranges = blockmap.parse((vms / newer / "volumes" / "data.changes" / older).read_text())
            want = volume(vms, newer).read_bytes()
            result = rebuild(volume(vms, older).read_bytes(), want, ranges)
            assert result == want, f"{newer} from {older}"

        # Unrelated, unknown or malformed names: ENOENT; the map is read-only.
        os.mkdir(vms / "stranger")
        volume(vms, "stranger").write_bytes(b"")
        base = vms / "work-next" / "volumes" / "data.changes"
        for name in ["stranger", "nobody", "work-v1@sunday", "work-v1@", "@monday"]:
            assert error_of(os.stat, base / name) == errno.ENOENT, name
        assert error_of(os.open, base / "fork", os.O_WRONLY) == errno.EACCES
        assert os.listdir(base) == []  # looked up by name, never listed
        assert error_of(os.rmdir, base) == errno.EPERM  # part of the layout
        assert error_of(os.unlink, base / "fork") == errno.EPERM
        assert "not related to VM 'work-next'" in tree.log()
        assert tree.status()["inventory"] == "ok"
    finally:
        tree.unmount()
