"""Kill the daemon while an operation runs, the way the crash loops do."""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from tests.helpers.tree import Tree

T = TypeVar("T")

CLIENT_TIMEOUT = 10.0
"""A client cut off by a dead daemon gets ENOTCONN within 2 s (the watchdog); a loaded
machine and a subprocess client (``cp``) may take a little longer to notice and exit."""


def killed_during(tree: Tree, operation: Callable[[], T], delay: float) -> tuple[bool, T | None]:
    """Run ``operation`` in a thread and SIGKILL the tree's daemon after ``delay`` seconds.

    Returns (True, its result) if it returned success before the daemon died, and
    (False, None) if the dead mount cut it off; any other failure is raised.
    """
    outcome: list[tuple[T] | BaseException] = []

    def work() -> None:
        try:
            outcome.append((operation(),))
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=work)
    worker.start()
    time.sleep(delay)
    assert tree.daemon is not None
    daemon = tree.daemon
    daemon.kill()
    tree.daemon = None
    # As an administrator meets it: the client is cut off (the watchdog), and only then
    # is the mount point cleared. A lazy unmount under a client still inside a call could
    # land its second path lookup on the directory below (EXDEV from a rename).
    worker.join(timeout=CLIENT_TIMEOUT)
    if worker.is_alive():
        daemon.abort_connection()  # so that the test fails rather than hangs
        worker.join(timeout=30)
        daemon.clear_dead()
        raise AssertionError(
            f"the operation still blocked {CLIENT_TIMEOUT:.0f} s after the daemon was killed"
        )
    daemon.clear_dead()
    result = outcome[0]
    if isinstance(result, OSError) and result.errno in (errno.ENOTCONN, errno.ECONNABORTED):
        return False, None
    if isinstance(result, BaseException):
        raise result
    return True, result[0]


def sound_after_recovery(tree: Tree, what: str) -> None:
    """What every round ends with: the mount says inventory ok with no open intent, and
    fsck of the unmounted SOURCE is clean; then the tree is mounted again."""
    from tests.fs.test_fsck import fsck

    status = tree.status()
    assert (status["inventory"], status["open_intents"]) == ("ok", "0"), what
    tree.unmount()
    status_code, out = fsck(tree)
    assert status_code == 0, f"{what}: fsck:\n{out}"
    tree.mount()
