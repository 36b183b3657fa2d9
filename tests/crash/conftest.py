"""The crash loops run on the same real mounts as tests/fs (a loop-mounted XFS SOURCE)
and tests/vm (libvirt and the demo guest)."""

from tests.fs.conftest import workdir
from tests.vm.conftest import demo_guest, libvirt_running, vmtree

__all__ = ["demo_guest", "libvirt_running", "vmtree", "workdir"]
