"""The device-mapper ioctl layout against the kernel header's numbers (linux/dm-ioctl.h).

Only the layout is checked here; tests/dmthin drives the ioctls against a real kernel.
"""

from __future__ import annotations

from vmtreefs.engine import dmioctl


def test_structs_have_the_kernel_sizes() -> None:
    assert dmioctl._HEADER.size == 312  # sizeof(struct dm_ioctl)
    assert dmioctl._SPEC.size == 40  # sizeof(struct dm_target_spec)


def test_request_numbers_match_the_kernel_header() -> None:
    # _IOWR(0xfd, nr, struct dm_ioctl) as the C preprocessor computes it.
    assert dmioctl._DEV_SUSPEND == 0xC138FD06
    assert dmioctl._TABLE_STATUS == 0xC138FD0C
    assert dmioctl._TARGET_MSG == 0xC138FD0E
