"""Run a command inside a running guest through its QEMU guest agent.

For tests with a real guest (the Debian suite): the guest must run ``qemu-ga``
and its domain must have the agent's channel, ``<channel type='unix'><target
type='virtio' name='org.qemu.guest_agent.0'/></channel>``. The demo guest runs
no agent, so nothing here works on it (``guest-ping`` fails with libvirt's
"QEMU guest agent is not connected").

The agent's protocol, as QEMU documents it (qga/qapi-schema.json): ``guest-exec``
with ``capture-output`` starts the program and answers its pid at once;
``guest-exec-status`` answers ``exited`` false until it ends, then its
``exitcode`` (or ``signal``) and its output, base64 in ``out-data`` and
``err-data``. qemu-ga keeps at most 16 MiB of each and says ``out-truncated``
beyond that. A status is answered once: the agent forgets the process after
it reported it exited.

Errors are libvirt's, as they come (``libvirt.libvirtError``): a command the
agent refuses (no such program, say) says so in its message. A command still
running after ``timeout`` raises :class:`TimeoutError`; it goes on in the guest.

    with connection() as conn:
        dom = conn.lookupByName(name)
        wait_for_agent(dom)
        first = guest_random_bytes(dom, 32)
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirt_qemu

AGENT_TIMEOUT = 10  # seconds libvirt waits for one answer of the agent
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class GuestResult:
    """How a program run in the guest ended, and what it wrote."""

    exitcode: int | None  # None when it was killed by a signal
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool  # qemu-ga kept only the first 16 MiB of stdout or stderr


def agent_command(dom: Any, execute: str, arguments: dict[str, Any] | None = None) -> Any:
    """One agent command through libvirt: its ``return`` value."""
    command: dict[str, Any] = {"execute": execute}
    if arguments is not None:
        command["arguments"] = arguments
    answer = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), AGENT_TIMEOUT, 0)
    return json.loads(answer)["return"]


def wait_for_agent(dom: Any, timeout: float = 120.0) -> None:
    """Until the agent answers ``guest-ping`` (what ``ready=agent`` waits for)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            agent_command(dom, "guest-ping")
            return
        except libvirt.libvirtError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{dom.name()}: the guest agent did not answer in {timeout:.0f} s: "
                    f"{e.get_error_message()}"
                ) from e
        time.sleep(POLL_SECONDS)


def guest_exec(
    dom: Any,
    path: str,
    args: Sequence[str] = (),
    stdin: bytes | None = None,
    timeout: float = 60.0,
) -> GuestResult:
    """Run ``path`` with ``args`` in the guest (searched in the agent's PATH) and wait
    for it to end: ``guest-exec`` with captured output, then ``guest-exec-status``."""
    arguments: dict[str, Any] = {"path": path, "arg": list(args), "capture-output": True}
    if stdin is not None:
        arguments["input-data"] = base64.b64encode(stdin).decode()
    pid = agent_command(dom, "guest-exec", arguments)["pid"]
    deadline = time.monotonic() + timeout
    while True:
        status = agent_command(dom, "guest-exec-status", {"pid": pid})
        if status["exited"]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{dom.name()}: {path} {' '.join(args)} still runs after {timeout:.0f} s"
            )
        time.sleep(POLL_SECONDS)
    return GuestResult(
        exitcode=status.get("exitcode"),
        signal=status.get("signal"),
        stdout=base64.b64decode(status.get("out-data", "")),
        stderr=base64.b64decode(status.get("err-data", "")),
        truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
    )


def guest_random_bytes(dom: Any, count: int) -> bytes:
    """``count`` bytes of the guest's /dev/urandom: two restores of one savestate must
    not give the same ones (their generation IDs differ, the kernel reseeded)."""
    result = guest_exec(dom, "head", ["-c", str(count), "/dev/urandom"])
    if result.exitcode != 0 or len(result.stdout) != count:
        raise AssertionError(
            f"{dom.name()}: head -c {count} /dev/urandom ended with {result.exitcode} "
            f"(signal {result.signal}), {len(result.stdout)} bytes: {result.stderr!r}"
        )
    return result.stdout
