"""Commands in a running guest through the QEMU guest agent, as `virsh qemu-agent-command` does.

The Debian guest has no network: the agent's virtio channel is how a test looks
inside, the way an administrator would with ``virsh qemu-agent-command``.
``guest-exec`` starts a program and ``guest-exec-status`` collects its exit code
and output (base64) once it has exited.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

from tests.helpers.libvirt import connection

AGENT_CALL_TIMEOUT = 30  # seconds libvirt waits for one answer


@dataclass(frozen=True)
class Ran:
    exitcode: int
    out: bytes
    err: bytes

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")


def _call(dom: Any, execute: str, **arguments: object) -> Any:
    command: dict[str, object] = {"execute": execute}
    if arguments:
        command["arguments"] = arguments
    answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), AGENT_CALL_TIMEOUT, 0)
    return json.loads(answer)["return"]


def wait_agent(domain: str, timeout: float = 300.0) -> float:
    """Until the guest agent answers ``guest-ping``; the seconds it took."""
    started = time.monotonic()
    last = ""
    with connection() as conn:
        while time.monotonic() - started < timeout:
            try:
                _call(conn.lookupByName(domain), "guest-ping")
                return time.monotonic() - started
            except libvirt.libvirtError as e:
                last = str(e)
            time.sleep(0.5)
    raise AssertionError(f"the guest agent of {domain} did not answer in {timeout:.0f} s: {last}")


def run(domain: str, argv: list[str], timeout: float = 120.0, check: bool = True) -> Ran:
    """Run ``argv`` in the guest and wait for it; ``check``: fail on a non-zero exit."""
    with connection() as conn:
        dom = conn.lookupByName(domain)
        pid = _call(dom, "guest-exec", path=argv[0], arg=argv[1:], **{"capture-output": True})[
            "pid"
        ]
        deadline = time.monotonic() + timeout
        while True:
            status = _call(dom, "guest-exec-status", pid=pid)
            if status["exited"]:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv} in {domain} still runs after {timeout:.0f} s")
            time.sleep(0.2)
    ran = Ran(
        status.get("exitcode", -1),
        base64.b64decode(status.get("out-data", "")),
        base64.b64decode(status.get("err-data", "")),
    )
    if check and ran.exitcode != 0:
        raise AssertionError(f"{argv} in {domain} exited {ran.exitcode}: {ran.err!r}")
    return ran


def sh(domain: str, script: str, timeout: float = 120.0, check: bool = True) -> Ran:
    """``sh -c SCRIPT`` in the guest."""
    return run(domain, ["/bin/sh", "-c", script], timeout, check)
