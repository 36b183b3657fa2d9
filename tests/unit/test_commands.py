"""The ctl grammar, checked without a mount."""

from __future__ import annotations

import errno

import pytest

from vmtreefs.errors import VmtreeError
from vmtreefs.rules.commands import GLOBAL_COMMANDS, MAX_CTL_WRITE, VM_COMMANDS, parse_command


def refusal(data: bytes, known: frozenset[str] = VM_COMMANDS) -> int:
    with pytest.raises(VmtreeError) as info:
        parse_command(data, known)
    return info.value.errno


def test_one_line_commands_parse() -> None:
    assert parse_command(b"start\n", VM_COMMANDS).verb == "start"
    cmd = parse_command(b"clone  test --replace", VM_COMMANDS)
    assert (cmd.verb, cmd.args) == ("clone", ("test", "--replace"))
    assert str(cmd) == "clone test --replace"
    assert parse_command(b"gc\n", GLOBAL_COMMANDS).verb == "gc"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"   \n",
        b"frobnicate",
        b"start\nstop\n",
        b"st\x00art",
        b"caf\xc3\xa9",
        b"\x1b[2J",
    ],
)
def test_malformed_commands_are_einval(data: bytes) -> None:
    assert refusal(data) == errno.EINVAL


def test_vm_commands_are_not_global_ones() -> None:
    assert refusal(b"start", GLOBAL_COMMANDS) == errno.EINVAL
    assert refusal(b"gc", VM_COMMANDS) == errno.EINVAL


def test_oversized_write_is_efbig() -> None:
    assert refusal(b"a" * (MAX_CTL_WRITE + 1)) == errno.EFBIG
    exactly_the_limit = b"clone " + b"x" * (MAX_CTL_WRITE - 6)
    assert parse_command(exactly_the_limit, VM_COMMANDS).verb == "clone"
