"""Which engine a new SOURCE gets, recorded once at ``init`` so every later mount agrees.

``auto`` prefers dm-thin (once that engine exists and device-mapper is there),
then reflink in place when SOURCE's filesystem can clone, then reflink on a
sparse XFS image inside SOURCE. The reason string says why, for the log and
for ``.vmtree/status``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from vmtreefs.engine.base import EngineError, EngineLedger, SnapshotEngine
from vmtreefs.engine.dmthin import DmThinEngine
from vmtreefs.engine.reflink import (
    FICLONE,
    LAYOUTS,
    XFS_MIN_IMAGE_SIZE,
    ReflinkEngine,
    filesystem_type,
)

ENGINES = ("auto", "reflink", "dm-thin")
"""What a user may ask for at init."""

# Errors that mean "this filesystem (or this pair of files) cannot clone".
_NO_REFLINK_ERRNOS = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}
)

_UNITS = {"": 1, "b": 1}
for _i, _letter in enumerate("kmgt", start=1):
    _UNITS[_letter] = 1024**_i
    _UNITS[_letter + "ib"] = 1024**_i
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*")


@dataclass(frozen=True)
class EngineConfig:
    """The engine recorded in SOURCE at init: ``engine``, its ``layout``, and an image size."""

    engine: str
    layout: str
    image_size: int | None
    options: dict[str, str] = field(default_factory=dict)  # dm-thin: pool id, devices

    def to_json(self) -> str:
        return json.dumps(
            {
                "engine": self.engine,
                "layout": self.layout,
                "image_size": self.image_size,
                "options": self.options,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, s: str) -> EngineConfig:
        """Parse what :meth:`to_json` wrote; anything else is EINVAL (a damaged SOURCE)."""
        try:
            data = json.loads(s)
        except ValueError as e:
            raise EngineError(errno.EINVAL, f"engine config is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise EngineError(errno.EINVAL, "engine config is not a JSON object")
        engine, layout, size = data.get("engine"), data.get("layout"), data.get("image_size")
        if not isinstance(engine, str) or not isinstance(layout, str):
            raise EngineError(errno.EINVAL, f"engine config lacks engine or layout: {s!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise EngineError(errno.EINVAL, f"engine config has a bad image_size: {size!r}")
        options = data.get("options", {})
        if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in options.items()
        ):
            raise EngineError(errno.EINVAL, f"engine config has bad options: {s!r}")
        return cls(engine=engine, layout=layout, image_size=size, options=options)


def parse_size(text: str) -> int:
    """Bytes from '20G', '512MiB', '1.5T' or '4096'; units are binary (K = 1024)."""
    m = _SIZE_RE.fullmatch(text)
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        raise EngineError(
            errno.EINVAL,
            f"bad size {text!r}: expected a number with an optional unit K, M, G, T "
            "(or KiB, MiB, GiB, TiB)",
        )
    try:
        exact = Decimal(m.group(1)) * unit
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise EngineError(errno.EINVAL, f"bad size {text!r}") from e
    if exact != exact.to_integral_value():
        raise EngineError(errno.EINVAL, f"bad size {text!r}: not a whole number of bytes")
    if exact <= 0:
        raise EngineError(errno.EINVAL, f"bad size {text!r}: must be positive")
    return int(exact)


def format_size(n: int) -> str:
    """'20.0 GiB', '512 B': the largest binary unit that keeps the number at least 1."""
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


def supports_reflink(directory: Path) -> bool:
    """Whether files in ``directory`` can be cloned: try it on two temporary files."""
    made: list[str] = []
    try:
        try:
            src_fd, src = tempfile.mkstemp(prefix=".vmtree-reflink-probe-", dir=directory)
            made.append(src)
            dst_fd, dst = tempfile.mkstemp(prefix=".vmtree-reflink-probe-", dir=directory)
            made.append(dst)
        except OSError as e:
            raise EngineError(
                e.errno or errno.EIO, f"cannot probe reflink in {directory}: {e.strerror or e}"
            ) from e
        try:
            os.write(src_fd, b"\0vmtree" * 585 + b"\0")  # one 4 KiB block
            fcntl.ioctl(dst_fd, FICLONE, src_fd)
        except OSError as e:
            if e.errno in _NO_REFLINK_ERRNOS:
                return False
            raise EngineError(
                e.errno or errno.EIO, f"reflink probe in {directory} failed: {e.strerror or e}"
            ) from e
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        return True
    finally:
        for name in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def _device_mapper_state() -> str:
    """A few words on device-mapper thin provisioning in this kernel, for reasons in logs."""
    if Path("/sys/module/dm_thin_pool").exists():
        return "device-mapper: present, thin-pool loaded"
    has_dm = Path("/dev/mapper/control").exists() or Path("/sys/module/dm_mod").exists()
    if not has_dm:
        with contextlib.suppress(OSError):
            has_dm = "device-mapper" in Path("/proc/misc").read_text()
    if not has_dm:
        return "device-mapper: absent in this kernel"
    try:
        out = subprocess.run(
            ["dmsetup", "targets"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "device-mapper: present, but dmsetup does not work"
    if "thin-pool" in out:
        return "device-mapper: present, thin-pool available"
    return "device-mapper: present, thin-pool not loaded (modprobe dm-thin-pool)"


def dmthin_available() -> tuple[bool, str]:
    """Whether dm-thin can be used here: the thin-pool target loads and the tools are there."""
    for tool in ("dmsetup", "thin_check", "thin_ls", "thin_metadata_size", "losetup"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed (Debian: lvm2, thin-provisioning-tools)"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["modprobe", "dm-thin-pool"], capture_output=True, timeout=60, check=False)
    state = _device_mapper_state()
    return state.endswith("thin-pool loaded") or state.endswith("thin-pool available"), state


def choose_engine(
    source: Path,
    requested: str,
    size: int,
    data_device: str | None = None,
    metadata_device: str | None = None,
) -> tuple[EngineConfig, str]:
    """The engine for a new SOURCE and a one-line reason why.

    ``size`` is the pool size, used only when the choice makes a pool (loop files or
    an XFS image). Given devices make a dm-thin pool on them.
    """
    if requested == "dmthin":
        requested = "dm-thin"
    if requested not in ENGINES:
        raise EngineError(
            errno.EINVAL, f"unknown engine {requested!r}; expected one of {', '.join(ENGINES)}"
        )
    if not Path(source).is_dir():
        raise EngineError(errno.ENOENT, f"SOURCE {source} is not a directory")
    if requested == "reflink" and data_device:
        if metadata_device:
            raise EngineError(errno.EINVAL, "the reflink engine takes a data= device only")
        return (
            EngineConfig("reflink", "xfs-image", None, {"device": data_device}),
            f"reflink on an XFS made on {data_device}",
        )
    if bool(data_device) != bool(metadata_device):
        raise EngineError(errno.EINVAL, "give both data= and metadata= devices, or neither")
    auto_note = ""
    if requested in ("auto", "dm-thin") or data_device:
        ok, why = dmthin_available()
        pool_id = secrets.token_hex(4)
        if ok and data_device:
            options = {"pool": pool_id, "data": data_device, "metadata": metadata_device or ""}
            return (
                EngineConfig("dmthin", "devices", None, options),
                f"dm-thin on data {data_device} and metadata {metadata_device}: {why}",
            )
        if ok:
            return (
                EngineConfig("dmthin", "loop-files", size, {"pool": pool_id}),
                f"dm-thin on {format_size(size)} of sparse loop files: {why}",
            )
        if requested == "dm-thin" or data_device:
            raise EngineError(errno.ENOTSUP, f"dm-thin is not usable here: {why}")
        auto_note = f" (auto: dm-thin is not usable: {why})"
    fstype = filesystem_type(source)
    if supports_reflink(source):
        return (
            EngineConfig(engine="reflink", layout="inplace", image_size=None),
            f"reflink in place: {source} is on {fstype}, which supports FICLONE{auto_note}",
        )
    if size < XFS_MIN_IMAGE_SIZE:
        raise EngineError(
            errno.EINVAL,
            f"{source} is on {fstype}, which has no reflink, and a pool of "
            f"{format_size(size)} is below the XFS minimum of {format_size(XFS_MIN_IMAGE_SIZE)}",
        )
    return (
        EngineConfig(engine="reflink", layout="xfs-image", image_size=size),
        f"reflink on a {format_size(size)} sparse XFS image: {source} is on {fstype}, "
        f"which has no reflink{auto_note}",
    )


def make_engine(source: Path, config: EngineConfig, ledger: EngineLedger) -> SnapshotEngine:
    """The (not yet started) engine a recorded config names; ``ledger`` is the store."""
    if config.engine == "dmthin":
        return DmThinEngine(
            source,
            config.layout,
            config.image_size or 0,
            config.options.get("pool", ""),
            ledger,
            config.options.get("data"),
            config.options.get("metadata"),
        )
    if config.engine == "reflink":
        if config.layout not in LAYOUTS:
            raise EngineError(errno.EINVAL, f"unknown reflink layout {config.layout!r}")
        return ReflinkEngine(source, config.layout, config.image_size, config.options.get("device"))
    raise EngineError(errno.EINVAL, f"engine {config.engine!r} is not available in this build")
