"""The ctl grammar, checked without a mount."""

from __future__ import annotations

import errno

import pytest

from vmtreefs.errors import VmtreeError
from vmtreefs.rules.commands import (
    DEFAULT_SHUTDOWN_TIMEOUT,
    GLOBAL_COMMANDS,
    MAX_CTL_WRITE,
    VM_COMMANDS,
    check_no_args,
    check_usage,
    parse_clone_args,
    parse_command,
    parse_grow_pool_args,
    parse_restore_args,
    parse_revert_args,
    parse_save_args,
    parse_shutdown_args,
    parse_version,
)


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


def usage_of(fn: object, *args: object) -> str:
    """The EINVAL reason a verb's argument parser gives."""
    with pytest.raises(VmtreeError) as info:
        fn(*args)  # type: ignore[operator]
    assert info.value.errno == errno.EINVAL
    return info.value.reason


def test_each_verbs_arguments() -> None:
    assert parse_clone_args(("test",)) == ("test", False)
    assert parse_clone_args(("--replace", "test")) == ("test", True)
    for bad in [(), ("a", "b"), ("-x",), ("a", "--force")]:
        assert usage_of(parse_clone_args, bad) == "usage: clone NEW [--replace]"
    check_usage("gc", ())
    assert usage_of(check_usage, "commit", ("now",)) == "usage: commit"
    assert parse_grow_pool_args(()) is None
    assert parse_grow_pool_args(("30G",)) == "30G"
    assert usage_of(parse_grow_pool_args, ("1G", "2G")) == "usage: grow-pool [SIZE]"
    assert parse_revert_args(("v3",)) == "v3"
    assert usage_of(parse_revert_args, ()) == "usage: revert vN"
    assert parse_version("v12") == 12
    for word in ["3", "v", "v-1", "vx", "v1234567890"]:
        assert usage_of(parse_version, word) == f"usage: revert vN (not {word!r})"
    assert parse_shutdown_args(()) == DEFAULT_SHUTDOWN_TIMEOUT
    assert parse_save_args(("nightly", "--stop")) == ("nightly", True)
    assert parse_restore_args(()) is None
    assert usage_of(check_no_args, "pause", ("x",)) == "usage: pause (it takes no arguments)"
