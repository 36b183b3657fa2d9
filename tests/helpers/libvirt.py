"""libvirt for tests: the daemons started when needed and stopped afterwards, domains removed.

There is no systemd on the test machines, so :func:`ensure_libvirt` runs
``scripts/libvirt-daemons.sh start PIDFILE``: it starts virtlogd and libvirtd
unless they already run, and waits until ``qemu:///system`` answers. When the
test process exits, ``scripts/libvirt-daemons.sh stop PIDFILE`` stops exactly
the daemons that the start call itself started (by pid, never by name): daemons
that were running before the tests stay running.

A libvirt that cannot be started raises :class:`LibvirtUnavailable`, which
makes the test fail with the script's output: never a silent skip.

:func:`cleanup_domains` destroys and undefines every domain whose name starts
with a prefix; :func:`removing_domains` does that when a ``with`` block ends,
however it ends. Tests name their domains with a prefix of their own (see
:func:`unique_prefix`) so that they never touch anyone else's.
"""

from __future__ import annotations

import atexit
import contextlib
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "libvirt-daemons.sh"
URI = "qemu:///system"
LIBVIRT_LOGS = Path("/var/log/libvirt/qemu")
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0


class LibvirtUnavailable(Exception):
    """The libvirt daemons could not be started, or ``qemu:///system`` does not answer."""


_lock = threading.Lock()
_pidfile: Path | None = None


def ensure_libvirt() -> None:
    """Make sure virtlogd and libvirtd run; those started here are stopped at exit.

    Cheap to call again: the script then finds both daemons running and starts
    nothing (or restarts one that died, which is then stopped at exit too).
    """
    global _pidfile
    with _lock:
        if _pidfile is None:
            directory = Path(tempfile.mkdtemp(prefix="vmtree-libvirt-"))
            _pidfile = directory / "started.pids"
            # Registered before starting: a start that fails half-way (virtlogd
            # started, libvirtd not) still has what it started stopped.
            atexit.register(stop_started_daemons)
        pidfile = _pidfile
        try:
            done = subprocess.run(
                ["bash", str(SCRIPT), "start", str(pidfile)],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise LibvirtUnavailable(f"{SCRIPT} start took more than {START_TIMEOUT:.0f} s") from e
        if done.returncode != 0:
            raise LibvirtUnavailable(
                f"{SCRIPT} start failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
            )


def stop_started_daemons() -> str:
    """Stop the daemons that :func:`ensure_libvirt` started; returns the script's output."""
    global _pidfile
    with _lock:
        pidfile = _pidfile
        _pidfile = None
        if pidfile is None:
            return ""
        try:
            done = subprocess.run(
                ["bash", str(SCRIPT), "stop", str(pidfile)],
                capture_output=True,
                text=True,
                timeout=STOP_TIMEOUT,
                check=False,
            )
        finally:
            if not pidfile.exists():
                shutil.rmtree(pidfile.parent, ignore_errors=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"{SCRIPT} stop failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
            )
        return done.stdout


def _quiet(_ctx: object, _error: object) -> None:
    """libvirt's default handler prints every error to stderr, even those caught."""


def open_connection(uri: str = URI) -> Any:
    """A read-write connection to ``uri``; for the machine's ``qemu:///system`` the
    daemons are started if need be (another URI is a libvirtd of the test's own)."""
    if uri == URI:
        ensure_libvirt()
    libvirt.registerErrorHandler(_quiet, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtUnavailable(f"cannot connect to {uri}: {e}") from e


@contextlib.contextmanager
def connection(uri: str = URI) -> Iterator[Any]:
    """:func:`open_connection`, closed when the block ends."""
    conn = open_connection(uri)
    try:
        yield conn
    finally:
        conn.close()


def unique_prefix(stem: str = "vmtreetest") -> str:
    """A domain name prefix of this test run's own, like ``vmtreetest-3fa2c1-``."""
    return f"{stem}-{secrets.token_hex(3)}-"


_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
)

_GONE = frozenset({libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID})
"""Errors that mean the domain is already stopped or gone: nothing left to do."""


def cleanup_domains(conn: Any, prefix: str) -> list[str]:
    """Destroy and undefine every domain whose name starts with ``prefix``.

    Running domains are destroyed (transient ones vanish with that), persistent
    ones are then undefined with their managed save and snapshot metadata.
    Every domain is tried; failures are raised together at the end. libvirt's
    logs of the prefix's domains go too. Returns the names of the domains found.
    """
    if not prefix:
        raise ValueError("cleanup_domains needs a non-empty prefix")
    names: list[str] = []
    failures: list[str] = []
    for dom in conn.listAllDomains(0):
        name = dom.name()
        if not name.startswith(prefix):
            continue
        names.append(name)
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in _GONE:
                failures.append(f"destroy {name}: {e}")
        try:
            if dom.isPersistent():
                dom.undefineFlags(_UNDEFINE_FLAGS)
        except libvirt.libvirtError as e:
            if e.get_error_code() not in _GONE:
                failures.append(f"undefine {name}: {e}")
    left = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)]
    if left:
        failures.append(f"still there: {', '.join(left)}")
    # libvirt keeps a log per domain name, also of the ones that are gone already.
    for log in LIBVIRT_LOGS.glob(f"{prefix}*.log"):
        log.unlink(missing_ok=True)
    if failures:
        raise RuntimeError("cleaning up domains failed: " + "; ".join(failures))
    return names


@contextlib.contextmanager
def removing_domains(conn: Any, prefix: str) -> Iterator[str]:
    """Yield ``prefix``; when the block ends, however, :func:`cleanup_domains` with it."""
    try:
        yield prefix
    finally:
        cleanup_domains(conn, prefix)
