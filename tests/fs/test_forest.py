"""`vmtreefs tree`: the forest drawn from a mounted tree, in text and for Graphviz."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers.tree import Tree, write_at

MiB = 1024 * 1024


def vmtreefs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmtreefs", *args], capture_output=True, text=True, timeout=60
    )


def test_tree_draws_lineage_versions_aliases_and_own_bytes(tree: Tree) -> None:
    vms = tree.vms
    os.mkdir(vms / "fedora")
    os.setxattr(vms / "fedora", "user.vmtree.preserve_history", b"1")
    os.setxattr(vms / "fedora", "user.vmtree.versioned", b"1")
    write_at(vms / "fedora-next" / "volumes" / "root.img", b"R" * MiB)
    (vms / "fedora-next" / "ctl").write_text("commit\n")
    os.mkdir(vms / "fedora-v2" / "clones" / "web")
    write_at(vms / "web" / "volumes" / "private.img", b"W" * 3 * MiB)
    os.mkdir(vms / "web" / "clones" / "web-test")
    write_at(vms / "web-test" / "volumes" / "private.img", b"T" * MiB, 8 * MiB)
    os.mkdir(vms / "work")
    os.symlink("../fedora", vms / "work" / "template")
    os.symlink("web", vms / "www")
    os.mkdir(vms / "alone")

    done = vmtreefs("tree", str(vms))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    by_name = {line.lstrip("│├└─ ").split()[0]: line for line in lines}
    assert set(by_name) == {
        "alone",
        "fedora-v1",
        "fedora-v2",
        "fedora-next",
        "web",
        "web-test",
        "work",
    }
    # Roots start at the margin; a clone sits below its origin, one level further in.
    assert by_name["alone"].startswith("alone  [halted]")
    assert by_name["fedora-v1"].startswith("fedora-v1  [halted]")
    depth = {name: len(line) - len(line.lstrip("│├└─ ")) for name, line in by_name.items()}
    assert depth["fedora-v2"] > depth["fedora-v1"]
    assert depth["web"] > depth["fedora-v2"]
    assert depth["web-test"] > depth["web"]
    assert lines.index(by_name["web-test"]) == lines.index(by_name["web"]) + 1
    # What each node says.
    assert "<- fedora" in by_name["fedora-v2"]  # the system alias names the newest version
    assert "<- www" in by_name["web"]
    assert "immutable" in by_name["fedora-v1"]
    assert "versioned" in by_name["fedora-next"] and "versions v1 v2" in by_name["fedora-next"]
    assert "template fedora" in by_name["work"]
    assert "own 1.0 MiB" in by_name["web-test"]  # what it wrote since the clone
    assert "own 0 B" in by_name["web"]  # web-test still shares all of web's 3 MiB
    print(done.stdout)

    dot = vmtreefs("tree", "--format", "dot", str(vms))
    assert dot.returncode == 0, dot.stderr
    assert dot.stdout.startswith("digraph vmtree {") and dot.stdout.rstrip().endswith("}")
    assert '"fedora-v2" -> "web";' in dot.stdout
    assert '"web" -> "web-test";' in dot.stdout
    assert '"fedora-v2" -> "work" [style=dashed];' in dot.stdout  # built on the template

    # Without a MOUNTPOINT: the only vmtreefs mount; a directory that is not one: exit 2.
    assert vmtreefs("tree").stdout == done.stdout
    plain = vmtreefs("tree", str(tree.workdir))
    assert plain.returncode == 2 and "not a mounted vmtreefs" in plain.stderr
