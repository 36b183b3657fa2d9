"""Run a shell script inside a throwaway Linux guest (virtme-ng + QEMU), or natively.

The host kernel here has no device-mapper, so dm-thin code is tested in a guest
booted from Debian's kernel package (``linux-image-amd64``): ``vng`` boots it
with the host's root shared read-only over 9p (the guest sees the same
``/work/main/.venv`` and ``/root/.pyenv``), a private writable overlay on
``/tmp``, ``/etc``, ``/var``..., and each ``rwdirs`` entry shared read-write at
the same path. ``scripts/guest-deps.sh`` installs everything this needs.

``run_in_guest(script, rwdirs=[...])`` writes ``script`` to a file (the kernel
command line that carries vng's command is limited to 2 KiB), boots the guest,
loads ``fuse loop dm-thin-pool dm-snapshot`` there, runs the script with bash in
``cwd`` and returns its exit status and the whole console log (kernel messages,
then the script's stdout and stderr), which also goes to ``log_path``.

The same call with ``native=True`` runs the same script on this machine instead
(for a host whose kernel has dm-thin itself): same wrapper, same markers, same
result type.

A guest that never reaches the script, dies under it, or runs past ``timeout``
raises :class:`GuestError` carrying the console log: never a silent skip.

Speed (TCG, 2 vCPUs): vng's defaults boot in about 30-50 s here. What brings it
to about 13 s before the script starts:

- ``--force-9p``: Debian 12's ``/usr/lib/qemu/virtiofsd`` is the old C daemon,
  which vng tries for 4 s before falling back to 9p anyway.
- the uncompressed ELF ``vmlinux`` (extracted once from the xz ``vmlinuz`` into
  ``build/guest/``) booted through its PVH entry: saves the 4-5 s that TCG
  spends decompressing the kernel.
- ``-cpu qemu64`` instead of vng's ``-cpu max`` under TCG, and a
  ``module_blacklist`` of the drivers udev would load for QEMU's q35 devices
  (AHCI, CD-ROM, watchdogs, KVM itself...): virtme-ng-init always runs udev's
  coldplug when systemd-udevd is installed, and under TCG loading and
  self-testing those modules took 10-20 s.

KVM: ``VMTREE_GUEST_KVM=1`` forces it, ``=0`` forces TCG; unset, a probe (QEMU
boots the kernel with KVM to its panic, a second or two where KVM works) decides
once per process. On the development machines ``/dev/kvm`` exists but QEMU
aborts at once ("failed to set MSR 0x10a"), so the probe answers TCG in 0.2 s.

Python in the guest runs about 30 times slower than on the host (TCG, and every
file lookup goes over 9p): ``python -c pass`` takes 3-4 s there, collecting a
pytest module with the default plugins 45 s. Boot once and run many tests in it
(:func:`run_pytest`), rather than one guest per test.

Other knobs: ``VMTREE_GUEST_ELF=0`` boots the compressed vmlinuz as it is;
``VMTREE_GUEST_LOG_DIR`` is where logs go when the caller names no ``log_path``
(default /tmp/vmtree-guest-logs).
"""

from __future__ import annotations

import contextlib
import functools
import lzma
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
CACHE_DIR = REPO_ROOT / "build" / "guest"
LOG_DIR = Path(os.environ.get("VMTREE_GUEST_LOG_DIR", "/tmp/vmtree-guest-logs"))

GUEST_MODULES = ("fuse", "loop", "dm-thin-pool", "dm-snapshot")
"""Loaded before the script runs (a virtme-ng guest starts with nothing loaded)."""

MARK = "@@vmtree-guest"
"""Prefix of the wrapper's own lines in the output: started, modules, exit."""

MODPROBE_FAILED = 97
"""The wrapper's exit status when the guest cannot load GUEST_MODULES."""

# Drivers udev's coldplug would load for QEMU's q35 machine and CPU. None of
# them is of use to the tests, and under TCG they cost 10-20 s of boot.
_MODULE_BLACKLIST = (
    "kvm,kvm_amd,kvm_intel,ccp,ahci,libahci,libata,sr_mod,cdrom,sg,i2c_i801,"
    "lpc_ich,iTCO_wdt,pcspkr,psmouse,serio_raw,evdev,i6300esb"
)

_KERNEL_INSTALL_HINT = "install it with scripts/guest-deps.sh (make deps-guest)"


class GuestError(Exception):
    """The guest did not boot, crashed, or timed out; ``log`` is its console output."""

    def __init__(self, message: str, log: str, log_path: Path | None) -> None:
        where = f" (full log: {log_path})" if log_path is not None else ""
        tail = "\n".join(log.splitlines()[-80:])
        super().__init__(f"{message}{where}\n--- last lines of the guest console ---\n{tail}")
        self.log = log
        self.log_path = log_path


class GuestUnavailable(Exception):
    """Something the guest needs is not installed (a kernel, vng, QEMU)."""


@dataclass(frozen=True)
class GuestResult:
    returncode: int
    """The script's exit status (in the guest or natively)."""
    output: str
    """Everything printed: console (kernel log) and the script's stdout and stderr."""
    duration: float
    """Seconds from starting vng (or bash) to its exit."""
    boot_seconds: float | None
    """Seconds until the wrapper started in the guest (None natively)."""
    peak_rss_kib: int
    """Peak resident memory of the largest process run (QEMU, in guest mode), KiB."""
    log_path: Path
    native: bool
    kvm: bool

    @property
    def script_output(self) -> str:
        """The output after the wrapper's start line: the script's own (plus late kernel lines)."""
        marker = f"{MARK} started"
        i = self.output.find(marker)
        if i < 0:
            return self.output
        j = self.output.find("\n", i)
        return self.output[j + 1 :] if j >= 0 else ""


# -- kernel -------------------------------------------------------------------


def _version_key(release: str) -> list[tuple[int, int | str]]:
    """Sort key like ``sort -V``: '6.1.0-56-amd64' < '6.1.0-112-amd64'."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", release) if p]


def _owned_by_package(path: Path) -> bool:
    done = subprocess.run(
        ["dpkg-query", "-S", str(path)], capture_output=True, text=True, check=False
    )
    return done.returncode == 0 and done.stdout.startswith("linux-image-")


def guest_kernel() -> Path:
    """The newest ``/boot/vmlinuz-*`` that a Debian linux-image package installed.

    Only kernels whose modules are in ``/lib/modules/RELEASE`` count (the guest
    loads dm-thin-pool, fuse and 9p from there). The host's running kernel is
    never used: it is usually not in /boot and has no device-mapper.
    """
    candidates = []
    for image in Path("/boot").glob("vmlinuz-*"):
        release = image.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / release / "modules.dep").is_file() and _owned_by_package(image):
            candidates.append((release, image))
    if not candidates:
        raise GuestUnavailable(
            f"no /boot/vmlinuz-* from a Debian linux-image package with its modules; "
            f"{_KERNEL_INSTALL_HINT}"
        )
    return max(candidates, key=lambda c: _version_key(c[0]))[1]


def _has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF vmlinux has the Xen PVH entry note QEMU needs to boot it directly."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:  # 64-bit little-endian
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _extract_vmlinux(vmlinuz: Path, target: Path) -> bool:
    """Decompress the xz payload of a bzImage into an ELF vmlinux; False if it is not one."""
    data = vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        return False
    try:
        elf = lzma.LZMADecompressor().decompress(data[start:])
    except lzma.LZMAError:
        return False
    if not _has_pvh_note(elf):
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, target)
    return True


def bootable_kernel(vmlinuz: Path | None = None) -> Path:
    """What vng boots: the ELF vmlinux of ``vmlinuz`` (cached in build/guest/) when it has a
    PVH entry, else ``vmlinuz`` itself. ``VMTREE_GUEST_ELF=0`` always gives ``vmlinuz``."""
    vmlinuz = vmlinuz or guest_kernel()
    if os.environ.get("VMTREE_GUEST_ELF", "1") == "0":
        return vmlinuz
    release = vmlinuz.name.removeprefix("vmlinuz-")
    cached = CACHE_DIR / f"vmlinux-{release}"
    source = vmlinuz.stat()
    try:
        if cached.stat().st_mtime >= source.st_mtime:
            return cached
    except FileNotFoundError:
        pass
    try:
        if _extract_vmlinux(vmlinuz, cached):
            return cached
    except OSError:
        pass
    return vmlinuz


# -- where we are ---------------------------------------------------------------


def in_guest() -> bool:
    """Whether this process runs inside a virtme-ng guest."""
    try:
        cmdline = Path("/proc/cmdline").read_text()
    except OSError:
        return False
    return "virtme_" in cmdline or "virtme.exec" in cmdline


def native_dmthin() -> bool:
    """Whether the running kernel has dm-thin: loaded, built in, or loadable as a module."""
    if Path("/sys/module/dm_thin_pool").exists():
        return True
    if shutil.which("modprobe") is None or shutil.which("dmsetup") is None:
        return False
    done = subprocess.run(
        ["modprobe", "-n", "-q", "dm-thin-pool"], capture_output=True, check=False
    )
    return done.returncode == 0


# virtme-ng's init mounts an empty tmpfs on these: a checkout below one is not there in the guest.
_HIDDEN_IN_GUEST = (Path("/tmp"), Path("/var/tmp"), Path("/run"))


def vng_path() -> Path:
    for hidden in _HIDDEN_IN_GUEST:
        if REPO_ROOT.is_relative_to(hidden):
            raise GuestUnavailable(
                f"the checkout {REPO_ROOT} is under {hidden}, which the guest covers with an "
                "empty tmpfs; clone it elsewhere (under /srv or /work) to run the guest tests"
            )
    vng = VENV_BIN / "vng"
    if not os.access(vng, os.X_OK):
        raise GuestUnavailable(f"{vng} is missing; {_KERNEL_INSTALL_HINT}")
    return vng


@functools.cache
def use_kvm() -> bool:
    """``VMTREE_GUEST_KVM`` (1 or 0) if set, else whether a KVM guest really boots here."""
    forced = os.environ.get("VMTREE_GUEST_KVM")
    if forced is not None:
        return forced == "1"
    return _kvm_boots()


def _kvm_boots() -> bool:
    """Boot the guest kernel under KVM with no root: it must reach its panic and exit."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False
    try:
        kernel = bootable_kernel()
    except GuestUnavailable:
        return False
    argv = [qemu, "-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256M"]
    argv += ["-display", "none", "-nodefaults", "-no-user-config", "-no-reboot"]
    argv += ["-serial", "stdio", "-kernel", str(kernel)]
    argv += ["-append", "console=ttyS0 panic=-1 loglevel=3 init=/nonexistent"]
    try:
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, check=False
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and b"Kernel panic" in done.stdout


# -- running --------------------------------------------------------------------


_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _wrapper(script_path: Path, cwd: Path, env: Mapping[str, str], native: bool) -> str:
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    modules = " ".join(GUEST_MODULES)
    # In a guest nothing is loaded yet; natively the modules may be built in
    # (modprobe says yes to those) or absent (then the script finds out itself).
    on_failure = "" if native else f"; exit {MODPROBE_FAILED}"
    return f"""\
# written by tests/helpers/guest.py
echo "{MARK} started uptime=$(cut -d' ' -f1 /proc/uptime) kernel=$(uname -r)"
if ! modprobe -a {modules}; then
  echo "{MARK} modprobe -a {modules} failed"{on_failure}
fi
{"" if native else "[ -e /dev/fuse ] || mknod -m 0666 /dev/fuse c 10 229"}
echo "{MARK} modules loaded uptime=$(cut -d' ' -f1 /proc/uptime)"
export PATH={shlex.quote(str(VENV_BIN))}:{_SYSTEM_PATH}
export PYTHONDONTWRITEBYTECODE=1
{exports}cd {shlex.quote(str(cwd))} || exit 98
bash {shlex.quote(str(script_path))} </dev/null
rc=$?
echo "{MARK} exit=$rc"
exit $rc
"""


_log_counter = 0
_log_lock = threading.Lock()


def _default_log_path() -> Path:
    global _log_counter
    with _log_lock:
        _log_counter += 1
        n = _log_counter
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return LOG_DIR / f"guest-{stamp}-{os.getpid()}-{n}.log"


def run_in_guest(
    script: str,
    *,
    rwdirs: Sequence[Path] = (),
    memory: str = "1G",
    cpus: int | None = None,
    timeout: float = 600,
    cwd: Path = REPO_ROOT,
    env: Mapping[str, str] | None = None,
    native: bool = False,
    log_path: Path | None = None,
    kernel: Path | None = None,
) -> GuestResult:
    """Run ``script`` with bash in a fresh guest (or natively) and return what happened.

    ``rwdirs`` are host directories the guest may write (same path inside);
    everything else of the host is read-only there, and the guest's /tmp is a
    private ~480 MiB (with 1G of memory) overlay. ``env`` is exported to the
    script. ``kernel`` overrides :func:`bootable_kernel`. A non-zero exit of the
    script is not an error: check ``returncode``.
    Raises :class:`GuestError` if the guest fails to boot, crashes or times out.
    """
    log_path = log_path or _default_log_path()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for d in rwdirs:
        if not Path(d).is_dir():
            raise ValueError(f"rwdir {d} is not a directory")

    run_dir = Path(tempfile.mkdtemp(prefix="vmtree-guest-run-", dir="/tmp"))
    try:
        os.chmod(run_dir, 0o755)
        script_path = run_dir / "script.sh"
        script_path.write_text(script)
        wrapper_path = run_dir / "wrapper.sh"
        wrapper_path.write_text(_wrapper(script_path, cwd, env or {}, native))
        kvm = False
        if native:
            argv = ["bash", str(wrapper_path)]
        else:
            kvm = use_kvm()
            argv = _vng_argv(wrapper_path, rwdirs, memory, cpus, kvm, kernel)
        return _execute(argv, timeout, log_path, native, kvm)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _vng_argv(
    wrapper: Path,
    rwdirs: Sequence[Path],
    memory: str,
    cpus: int | None,
    kvm: bool,
    kernel: Path | None,
) -> list[str]:
    kernel = kernel or bootable_kernel()
    argv = [str(vng_path()), "--run", str(kernel), "--verbose", "--force-9p"]
    argv += ["--memory", memory, "--append", f"module_blacklist={_MODULE_BLACKLIST}"]
    if cpus is not None:
        argv += ["--cpus", str(cpus)]
    if not kvm:
        argv += ["--disable-kvm", "--qemu-opts=-cpu qemu64"]
    for d in rwdirs:
        argv.append(f"--rwdir={Path(d).resolve()}")
    argv += ["--", f"bash {shlex.quote(str(wrapper))}"]
    return argv


def _execute(
    argv: list[str], timeout: float, log_path: Path, native: bool, kvm: bool
) -> GuestResult:
    env = dict(os.environ)
    # vng runs virtme-run through the shell, so the venv must be on PATH.
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    started = time.monotonic()
    chunks: list[str] = []
    boot_at: list[float] = []
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        log.write(f"# {shlex.join(argv)}\n")
        log.flush()
        # Its own session: on a timeout the whole tree (vng, virtme-run, QEMU)
        # is ended through the process group that this child leads.
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        _RUNNING.add(proc.pid)
        if _STOPPING.is_set():  # the session ended while this guest was being started
            _kill_group(proc.pid, signal.SIGKILL)
        assert proc.stdout is not None
        stdout = proc.stdout

        def read() -> None:
            for raw in iter(stdout.readline, b""):
                # The serial console ends its lines with CRLF.
                line = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
                if not boot_at and f"{MARK} started" in line:
                    boot_at.append(time.monotonic() - started)
                chunks.append(line)
                log.write(line)
                log.flush()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        timed_out = threading.Event()
        reaped = threading.Event()

        def kill() -> None:
            timed_out.set()
            _kill_group(proc.pid, signal.SIGTERM)
            if not reaped.wait(10):
                _kill_group(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            # wait4 rather than Popen.wait: its rusage gives the peak RSS of the
            # largest process in the tree (QEMU: virtme-run waits for it).
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            # Interrupted (Ctrl-C): take the guest down with us, then reap it.
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            reaped.set()
            timer.cancel()
            _RUNNING.discard(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=30)
        stdout.close()
        duration = time.monotonic() - started
        start = f", script started at {boot_at[0]:.1f} s" if boot_at else ""
        rss = usage.ru_maxrss // 1024
        log.write(
            f"# exit status {proc.returncode} after {duration:.1f} s{start}, peak RSS {rss} MiB\n"
        )

    output = "".join(chunks)
    what = "native run" if native else "guest"
    if timed_out.is_set():
        raise GuestError(f"{what} timed out after {timeout:.0f} s", output, log_path)
    if not boot_at:
        raise GuestError(
            f"{what} never started the script (exit status {proc.returncode})", output, log_path
        )
    exits = re.findall(rf"{re.escape(MARK)} exit=(\d+)", output)
    if not exits:
        raise GuestError(
            f"{what} died while running the script (exit status {proc.returncode})",
            output,
            log_path,
        )
    returncode = int(exits[-1])
    if returncode == MODPROBE_FAILED and f"{MARK} modprobe" in output:
        raise GuestError(f"{what} could not load {' '.join(GUEST_MODULES)}", output, log_path)
    return GuestResult(
        returncode=returncode,
        output=output,
        duration=duration,
        boot_seconds=None if native else boot_at[0],
        peak_rss_kib=usage.ru_maxrss,
        log_path=log_path,
        native=native,
        kvm=kvm,
    )


_RUNNING: set[int] = set()
"""Process groups of the guests (or native runs) under way, led by our own children."""
_STOPPING = threading.Event()


def stop_all_guests() -> None:
    """End every guest this process started that still runs, and any it starts from now
    on (a session that ends while a guest runs in a thread)."""
    _STOPPING.set()
    for pgid in list(_RUNNING):
        _kill_group(pgid, signal.SIGKILL)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def run_module_in_guest(
    module: str, argv: Sequence[str] | None, *, memory: str, timeout: float
) -> int:
    """``python -m MODULE ARGV`` in a guest (a benchmark where the host has no dm-thin):
    prints its output without the kernel's lines; returns its exit status."""
    print("no dm-thin in this kernel: running in the test guest", file=sys.stderr)
    command = [sys.executable, "-m", module, *(sys.argv[1:] if argv is None else argv)]
    result = run_in_guest(shlex.join(command), memory=memory, timeout=timeout)
    kernel_line = re.compile(rf"^\[\s*\d+\.\d+\] |^{MARK} ")
    for line in result.script_output.splitlines():
        if not kernel_line.match(line):
            print(line)
    return result.returncode


class GuestRunner:
    """:func:`run_in_guest` bound to a mode (guest or native) and a log directory."""

    def __init__(self, native: bool, log_dir: Path) -> None:
        self.native = native
        self.log_dir = log_dir
        self.count = 0

    def __call__(
        self,
        script: str,
        *,
        rwdirs: Sequence[Path] = (),
        memory: str = "1G",
        timeout: float = 600,
        env: Mapping[str, str] | None = None,
    ) -> GuestResult:
        """Run ``script``; the log is ``log_dir/guest-N.log``."""
        self.count += 1
        return run_in_guest(
            script,
            rwdirs=rwdirs,
            memory=memory,
            timeout=timeout,
            env=env,
            native=self.native,
            log_path=self.log_dir / f"guest-{self.count}.log",
        )


# -- pytest in the guest ----------------------------------------------------------

LIGHT_PYTEST_OPTIONS = (
    "-p",
    "no:trio",
    "-p",
    "no:hypothesispytest",
    "-W",
    "ignore:Unknown config option:pytest.PytestConfigWarning",
)
"""Leave out pytest-trio (which imports hypothesis) and hypothesis's plugin.

Under TCG the guest runs Python about 30 times slower than the host, and these
two plugins are most of pytest's start-up: without them collecting
tests/engine/test_select.py took about 20 s in the guest instead of 45 s. Only
for tests with no ``async def`` tests (hypothesis's ``@given`` still works
without its plugin). pyproject's ``trio_mode`` then warns as an unknown option:
hence the -W.
"""


@dataclass(frozen=True)
class PytestReport:
    """What a pytest run in the guest reported in its junit XML, and the guest run."""

    tests: int
    failures: int
    errors: int
    skipped: int
    result: GuestResult

    @property
    def ok(self) -> bool:
        return self.result.returncode == 0 and self.failures == 0 and self.errors == 0


def run_pytest(
    args: Sequence[str],
    *,
    results_dir: Path,
    light: bool = True,
    native: bool = False,
    timeout: float = 1800,
    memory: str = "1G",
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> PytestReport:
    """``python -m pytest ARGS`` in a guest (or natively), its junit XML in ``results_dir``.

    ``results_dir`` is shared read-write with the guest; pytest's cache is off
    (the guest sees the checkout read-only). ``light`` adds
    :data:`LIGHT_PYTEST_OPTIONS`; ``env`` is exported to pytest there. A missing or
    unreadable report raises :class:`GuestError` with the guest's log.
    """
    junit = results_dir / "junit.xml"
    junit.unlink(missing_ok=True)
    argv = [str(VENV_BIN / "python"), "-m", "pytest", "-p", "no:cacheprovider"]
    argv += [f"--junitxml={junit}", *(LIGHT_PYTEST_OPTIONS if light else ()), *args]
    result = run_in_guest(
        shlex.join(argv),
        rwdirs=[results_dir],
        timeout=timeout,
        memory=memory,
        native=native,
        log_path=log_path,
        env=env,
    )
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError) as e:
        message = f"pytest wrote no readable {junit}: {e}"
        raise GuestError(message, result.output, result.log_path) from e
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(s.get(key, "0")) for s in suites)
        for key in ("tests", "failures", "errors", "skipped")
    }
    return PytestReport(result=result, **counts)
