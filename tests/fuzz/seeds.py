"""Write the seed corpus, ``tests/fuzz/corpus/NAME/``: a few valid inputs a target.

``python -m tests.fuzz.seeds`` makes them again (they are committed; a run of the
fuzzer adds what it finds to a scratch directory, never to these).
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from vmtreefs.engine.select import EngineConfig
from vmtreefs.rules import domain
from vmtreefs.saveimage import MAGIC

CORPUS = Path(__file__).resolve().parent / "corpus"


def save_image(xml: str, cookie: bytes | None, data_len: int, was_running: int) -> bytes:
    """A libvirt 9.0 save image (version 2) with a short stream after its header region."""
    xml_bytes = xml.encode() + b"\0"
    region = xml_bytes + (cookie + b"\0" if cookie is not None else b"")
    header = struct.pack(
        "<16s5I14I",
        MAGIC,
        2,
        data_len,
        was_running,
        0,
        len(xml_bytes) if cookie is not None else 0,
        *([0] * 14),
    )
    return header + region.ljust(data_len, b"\0") + b"QEVM\0\0\0\3stream"


DEMO = domain.demo_domain("/srv/guest", "qemu")

SEEDS: dict[str, list[bytes]] = {
    "ctl": [
        b"start\n",
        b"shutdown --timeout 30\n",
        b"save before-upgrade --stop\n",
        b"restore before-upgrade",
        b"clone work2 --replace\n",
        b"revert v3\n",
        b"grow-pool 1.5G\n",
        b"disposable\n",
    ],
    "mount_options": [
        b"engine=reflink,size=20G",
        b"engine=dmthin,data=/dev/vdb,metadata=/dev/vdc\0allow_other",
        b"libvirt=none,debug,x-systemd.automount,accel=tcg",
    ],
    "properties": [
        b"user.vmtree.memory=512\n",
        b"user.vmtree.ready=console:login: $",
        b"user.vmtree.ready=delay:5",
        b"user.vmtree.ready=console:(tick ){2}[0-9]{1,3}",
        b"user.vmtree.ready=agent",
        b"user.vmtree.versioned=1",
        b"user.vmtree.commit=manual",
        b"user.vmtree.policy=volatile",
        b"user.vmtree.id=3",
    ],
    "names": [b"work", b"root.img", b"before-upgrade.1", b"latest", b"debian-v2"],
    "domain": [
        DEMO.encode(),
        b"<domain type='kvm'><os><type>hvm</type><boot dev='hd'/></os>"
        b"<devices><disk type='file' device='cdrom'><target dev='sda'/></disk>"
        b"<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
        b"</channel></devices></domain>",
        domain.render(
            DEMO,
            domain.Identity("vmtree-t-7", domain.domain_uuid("t", 7), "/run/c.log"),
            256,
            1,
            [domain.Disk("root", "/dev/mapper/r", True, True)],
        ).encode(),
    ],
    "saveimage": [
        save_image("<domain type='qemu'><name>vmtree-t-1</name></domain>", None, 96, 1),
        save_image(
            "<domain type='kvm'><name>a</name><devices/></domain>", b"<qemu-migration/>", 160, 0
        ),
    ],
    "change_map": [
        b"0 65536\n131072 4096\n",
        b"",
        b"\x40\x20\x01\x05\xf0\x02\x07\x10\x21\x03\x40\x80",
    ],
    "status": [
        b"engine: reflink\ntree_id: 1a2b\nengine_detail: reflink on XFS image /s/r.xfs\n"
        b"pool_size: 21474836480\ninventory: ok\n",
        b"engine_detail: a \\012 newline\ninventory_difference: vm 3 \\134 x\n",
    ],
    "dmthin": [
        b"0 41943040 thin-pool 3 152/12800 2/327680 - rw discard_passdown queue_if_no_space - 1024",
        b"0 262144 thin-pool Fail",
        b"0 2097152 thin 2048 4095",
        b"0 2097152 thin 0 -",
        b"1 65536 0\n2 131072 65536\n",
        b'<superblock uuid="" time="0" transaction="1" data_block_size="128" nr_data_blocks="0">'
        b'<diff left="1" right="2"><same begin="0" length="4"/>'
        b'<different begin="4" length="2"/><right_only begin="8" length="1"/></diff>'
        b"</superblock>",
    ],
    "engine_config": [
        EngineConfig("reflink", "image", 20 << 30, {}).to_json().encode(),
        EngineConfig("dmthin", "devices", None, {"data": "/dev/vdb"}).to_json().encode(),
    ],
}


def main() -> None:
    for name, seeds in SEEDS.items():
        directory = CORPUS / name
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.iterdir():
            old.unlink()
        for seed in seeds:
            (directory / hashlib.sha1(seed).hexdigest()[:16]).write_bytes(seed)
        print(f"{name}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
