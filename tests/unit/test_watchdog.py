"""The watchdog's decisions, with the daemon's state read from a stand-in: what it does
once told ``bye``, once its pipe closes, and when the daemon is dying with a connection
named. That a real dying daemon's clients are freed is tests/crash/test_dead_daemon.py."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from vmtreefs.app import fuseconn, watchdog


class Daemon:
    """The daemon's state as the watchdog reads it, and the aborts it asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.state = "running"
        self.aborted: list[int] = []
        monkeypatch.setattr(fuseconn, "running", lambda pid: self.state == "running")
        monkeypatch.setattr(fuseconn, "dying", lambda pid: self.state == "dying")
        monkeypatch.setattr(fuseconn, "abort", self.abort)
        monkeypatch.setattr(watchdog, "POLL_SECONDS", 0.01)

    def abort(self, connection: int) -> bool:
        self.aborted.append(connection)
        return True


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_bye_ends_it_without_an_abort(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    daemon = Daemon(monkeypatch)
    dog = watchdog.Watchdog(1234, pipe[0])
    os.write(pipe[1], b"conn 41\n")
    assert dog.step() and dog.connection == 41
    os.write(pipe[1], b"bye\n")
    daemon.state = "gone"  # a daemon that unmounted: its connection number may be reused
    assert not dog.step()
    assert daemon.aborted == []


def test_a_dying_daemon_gets_its_connection_aborted_once(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    daemon = Daemon(monkeypatch)
    dog = watchdog.Watchdog(1234, pipe[0])
    os.write(pipe[1], b"conn 7\n")
    assert dog.step()
    daemon.state = "dying"
    assert dog.step() and dog.step()
    assert daemon.aborted == [7]
    os.close(pipe[1])  # it finished dying: its files are closed
    assert not dog.step()


def test_a_stopped_daemon_is_not_dead(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    daemon = Daemon(monkeypatch)
    dog = watchdog.Watchdog(1234, pipe[0])
    os.write(pipe[1], b"co")
    os.write(pipe[1], b"nn 3\n")  # a line may come in pieces
    for _ in range(5):
        assert dog.step()
    assert (dog.connection, daemon.aborted) == (3, [])


def test_end_of_file_without_bye_ends_it_without_an_abort(
    monkeypatch: pytest.MonkeyPatch, pipe: tuple[int, int]
) -> None:
    daemon = Daemon(monkeypatch)
    dog = watchdog.Watchdog(1234, pipe[0])
    os.write(pipe[1], b"conn 5\n")
    os.close(pipe[1])  # every thread exited: the kernel closed /dev/fuse itself
    daemon.state = "gone"
    while dog.step():
        pass
    assert daemon.aborted == []


def test_dying_reads_a_real_process() -> None:
    """Of this very process: alive, not dying; of a pid that is not there: gone."""
    assert fuseconn.running(os.getpid()) and not fuseconn.dying(os.getpid())
    assert not fuseconn.running(2**22 + 1) and not fuseconn.dying(2**22 + 1)
