"""The one exception type that carries an errno from any layer up to the FUSE boundary."""

from __future__ import annotations

import errno
import os


class VmtreeError(Exception):
    """A refusal with the errno the user sees and the reason the administrator reads in the log."""

    def __init__(self, errno_: int, reason: str) -> None:
        super().__init__(f"{errno.errorcode.get(errno_, errno_)}: {reason}")
        self.errno = errno_
        self.reason = reason

    @property
    def errname(self) -> str:
        return errno.errorcode.get(self.errno, str(self.errno))

    def describe(self) -> str:
        return f"{self.reason} ({self.errname}: {os.strerror(self.errno)})"
