"""Several clients race on the same few names; afterwards nothing is half-made.

Each thread makes its own system calls, so the daemon sees them concurrently;
what any one of them is told does not matter here, only that in the end every
VM is whole, every alias leads somewhere, and fsck finds the tree clean.
"""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from tests.fs.test_fsck import fsck
from tests.helpers.tree import Tree

NAMES = ["a", "b", "c"]
CLIENTS = 6
STEPS = 60


def client(vms: Path, seed: int, errors: list[BaseException]) -> None:
    rng = random.Random(seed)
    for _ in range(STEPS):
        x, y = rng.choice(NAMES), rng.choice(NAMES)
        action = rng.choice(["mkdir", "clone", "rmdir", "mv", "ln", "rm", "grow"])
        try:
            if action == "mkdir":
                os.mkdir(vms / x)
            elif action == "clone":
                os.mkdir(vms / x / "clones" / y)
            elif action == "rmdir":
                os.rmdir(vms / x)
            elif action == "mv":
                os.rename(vms / x, vms / y)
            elif action == "ln":
                os.symlink(y, vms / x)
            elif action == "rm":
                os.unlink(vms / x)
            else:
                os.truncate(vms / x / "volumes" / "private.img", rng.randrange(1, 8) << 30)
        except OSError:
            pass  # losing a race is an answer too
        except BaseException as e:
            errors.append(e)
            return


def test_racing_clients_leave_nothing_half_made(tree: Tree) -> None:
    errors: list[BaseException] = []
    threads = [
        threading.Thread(target=client, args=(tree.vms, seed, errors)) for seed in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads), errors
    tree.unmount()
    status, out = fsck(tree)
    assert status == 0, out
    vms = tree.mount()
    status_lines = tree.status()
    assert (status_lines["inventory"], status_lines["open_intents"]) == ("ok", "0")
    for name in os.listdir(vms):
        if name.startswith("."):
            continue
        path = vms / name
        if path.is_symlink():
            assert path.resolve().is_dir(), f"alias {name} leads nowhere"
            assert path.resolve().parent == vms.resolve(), f"alias {name} leads outside"
        else:
            volumes = sorted(p for p in os.listdir(path / "volumes") if p.endswith(".img"))
            assert volumes == ["private.img", "root.img", "volatile.img"], (name, volumes)
            links = [path / "origin", *(path / "clones").iterdir()]
            for link in (p for p in links if p.is_symlink()):
                target = link.resolve()
                assert target.parent == vms.resolve() and target.is_dir(), link
