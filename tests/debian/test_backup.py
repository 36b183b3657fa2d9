"""Backup of a running Debian VM with borg (Debian's borgbackup), and restore into new VMs.

The recipe of docs/guests.md, run as written: ``save`` points of the running
VM, ``scripts/vmtree-borg`` reads a point's volumes through the mount (whole
the first time, only the change map's ranges after), then restores each point
into a new VM through the mount, and the restored VM boots.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.debian.conftest import IMAGE_DIR, DebianTree

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "vmtree-borg"
VOLUMES = ["root", "private"]  # volatile.img starts empty at each start: nothing to keep


@pytest.fixture
def borg_repo() -> Iterator[tuple[str, dict[str, str]]]:
    if shutil.which("borg") is None:
        pytest.fail("borg is missing: `make test-debian` installs borgbackup", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="vmtree-borg-test-") as top:
        env = dict(
            os.environ,
            BORG_BASE_DIR=top,
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        )
        repo = f"{top}/repo"
        subprocess.run(["borg", "init", "--encryption=none", repo], env=env, check=True)
        yield repo, env


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def vmtree_borg(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(["python3", str(SCRIPT), *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"vmtree-borg {args}:\n{done.stdout}{done.stderr}"
    return done.stdout


def restore_into(tree: DebianTree, name: str, images: Path) -> Path:
    """A new VM made from restored images, through the mount."""
    vm = tree.vms / name
    vm.mkdir()
    os.setxattr(vm, "user.vmtree.memory", b"512")
    (vm / "volumes" / "root.img").unlink()  # the backed-up root is 2 GiB, not the default 10
    for volume in VOLUMES:
        subprocess.run(
            ["cp", "--sparse=always", str(images / f"{volume}.img"), str(vm / "volumes")],
            check=True,
        )
    shutil.copyfile(IMAGE_DIR / "domain.xml", vm / "domain.xml")
    return vm


def test_borg_backs_up_a_running_vm_incrementally_and_the_restored_vm_boots(
    tree: DebianTree, borg_repo: tuple[str, dict[str, str]]
) -> None:
    repo, env = borg_repo
    vm = "office"
    tree.appvm(vm)
    tree.boot(vm, "AppVM start to login")
    first = tree.sh(vm, "head -c 8M /dev/urandom > /home/one && sync && sha256sum /home/one")

    assert tree.ctl(vm, "save b1") == "b1" and tree.state(vm) == "running"
    b1 = tree.vms / vm / "savestates" / "b1" / "volumes"
    vmtree_borg(env, "full", f"{repo}::b1", str(b1), *VOLUMES)

    second = tree.sh(vm, "head -c 4M /dev/urandom > /home/two && sync && sha256sum /home/two")
    assert tree.ctl(vm, "save b2") == "b2" and tree.state(vm) == "running"
    b2 = tree.vms / vm / "savestates" / "b2" / "volumes"
    said = vmtree_borg(env, "incremental", f"{repo}::b2", str(b2), f"{vm}@b1", *VOLUMES)
    read, total = map(int, re.search(r"read (\d+) bytes of (\d+)", said).groups())  # type: ignore[union-attr]
    listed = sum(
        int(line.split()[1])
        for volume in VOLUMES
        for line in (b2 / f"{volume}.changes" / f"{vm}@b1").read_text().splitlines()
    )
    assert read == listed, "the incremental backup read exactly what the change maps list"
    assert 4 << 20 <= read < total // 20, f"read {read} of {total} bytes: not an increment"
    tree.shutdown(vm)

    with tempfile.TemporaryDirectory(prefix="vmtree-restore-") as out:
        vmtree_borg(env, "restore", repo, f"{out}/b1", "b1")
        vmtree_borg(env, "restore", repo, f"{out}/b2", "b1", "b2")
        restored = {
            "r1": restore_into(tree, "r1", Path(out, "b1")),
            "r2": restore_into(tree, "r2", Path(out, "b2")),
        }
    for name, point in (("r1", b1), ("r2", b2)):
        for volume in VOLUMES:
            assert sha256(restored[name] / "volumes" / f"{volume}.img") == sha256(
                point / f"{volume}.img"
            ), f"{name}/{volume}.img differs from what was backed up"

    tree.boot("r2", "restored VM start to login")
    assert tree.sh("r2", "sha256sum /home/one /home/two") == first + second
    tree.shutdown("r2")
