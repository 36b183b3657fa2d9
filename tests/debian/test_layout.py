"""The Debian guest as a dom0 user runs it: its own boot, and a Qubes-like template layout.

What is checked is what the user would look at: the console's login prompt,
what ``findmnt`` says inside the guest (through the guest agent), the files a
VM wrote after it restarts, and the alias of a versioned template.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from tests.debian.conftest import DebianTree
from tests.helpers.libvirt import connection


def test_it_boots_from_its_own_root_volume_to_login_and_the_agent_answers(
    tree: DebianTree,
) -> None:
    tree.boot("debian", "first start to login (formats private)")
    assert tree.state("debian") == "running"
    with connection() as conn:
        running = ET.fromstring(conn.lookupByName(tree.domain("debian")).XMLDesc(0))
    assert running.find("os/kernel") is None, "booted by the host's kernel, not from its disk"
    boot = running.find("os/boot")
    assert boot is not None and boot.get("dev") == "hd"

    mounts = tree.sh("debian", "findmnt -no SOURCE /; findmnt -no SOURCE /home").split()
    assert mounts == ["/dev/vda1", "/dev/vdb"], "root from root.img, /home on private.img"
    swap = tree.sh("debian", "swapon --show=NAME --noheadings").split()
    assert swap == ["/dev/vdc"], "volatile.img is swap"

    tree.shutdown("debian")
    assert tree.state("debian") == "halted"


def test_qubes_layout_home_is_kept_root_comes_from_the_template_at_each_start(
    tree: DebianTree,
) -> None:
    vms = tree.vms
    os.setxattr(vms / "debian", "user.vmtree.versioned", b"1")
    assert os.readlink(vms / "debian") == "debian-v1"
    tree.appvm("work")
    assert os.readlink(vms / "work" / "template") == "../debian"

    tree.boot("work", "AppVM start to login")
    tree.sh("work", "echo kept > /home/note && sync /home/note")
    tree.sh("work", "echo lost > /usr/local/note && sync /usr/local/note")
    assert "VMTREE_RELEASE" not in tree.sh("work", "cat /usr/lib/os-release")

    # The template's head changes a package's file and shuts down: a commit, while work runs.
    tree.boot("debian-next", "template head start to login")
    tree.sh("debian-next", "echo VMTREE_RELEASE=2 >> /usr/lib/os-release && sync")
    tree.shutdown("debian-next")
    assert os.readlink(vms / "debian") == "debian-v2", "the shutdown of the head committed v2"
    assert "commit debian-next" in (vms / ".vmtree" / "events").read_text()

    assert "VMTREE_RELEASE" not in tree.sh("work", "cat /usr/lib/os-release"), (
        "a running VM keeps the version it started from"
    )
    tree.shutdown("work")

    tree.boot("work", "AppVM start to login")
    assert tree.sh("work", "cat /home/note") == "kept\n", "private.img is the VM's own"
    assert tree.exitcode("work", "test -e /usr/local/note") == 1, (
        "root.img came fresh from the template"
    )
    assert "VMTREE_RELEASE=2" in tree.sh("work", "cat /usr/lib/os-release"), (
        "the next start takes the new version"
    )
    tree.shutdown("work")
