"""The change-map arithmetic (pure), thin_delta's report and the lineage rule."""

from __future__ import annotations

import errno
import random

import pytest

from vmtreefs.engine.base import EngineError
from vmtreefs.engine.dmthin import parse_thin_delta
from vmtreefs.rules import blockmap, lineage
from vmtreefs.rules.blockmap import Mapping
from vmtreefs.rules.names import ModelError
from vmtreefs.rules.namespace import Namespace
from vmtreefs.rules.objects import Savestate, Vm, Volume


def test_merge_joins_touching_and_overlapping_ranges() -> None:
    assert blockmap.merge([(10, 5), (0, 10), (20, 0), (14, 3), (30, 1)]) == [(0, 17), (30, 1)]
    assert blockmap.clip([(0, 10), (8, 10), (20, 5)], 12) == [(0, 10), (8, 4)]


def test_same_physical_blocks_and_both_holes_are_unchanged() -> None:
    shared = [Mapping(0, 100, 5000)]
    assert blockmap.differences(shared, 100, shared, 100) == []
    assert blockmap.differences([], 100, [], 100) == []
    moved = [Mapping(0, 40, 5000), Mapping(40, 20, 9000), Mapping(60, 40, 5060)]
    assert blockmap.differences(moved, 100, shared, 100) == [(40, 20)]
    # Data against a hole differs, both ways; a zero mapping (unwritten) is a hole.
    assert blockmap.differences([Mapping(10, 10, 1)], 100, [Mapping(10, 10, None)], 100) == [
        (10, 10)
    ]
    assert blockmap.differences([], 100, [Mapping(90, 20, 7)], 100) == [(90, 10)]


def test_sizes_differ() -> None:
    # A grown volume: what lies past the old end counts only where it holds data.
    assert blockmap.differences([Mapping(0, 200, 0)], 200, [Mapping(0, 100, 0)], 100) == [
        (100, 100)
    ]
    assert blockmap.differences([Mapping(0, 100, 0)], 200, [Mapping(0, 100, 0)], 100) == []
    # The other is larger: its data past this one's end is not in this one's map.
    assert blockmap.differences([], 50, [Mapping(0, 100, 3)], 100) == [(0, 50)]


def test_rebuilding_from_random_mappings_is_exact() -> None:
    """Model the data as the physical address of each byte: the map must cover
    every byte whose address differs, whatever the extents look like."""
    rng = random.Random(5)
    for _ in range(300):
        size_a, size_b = rng.randrange(1, 200), rng.randrange(1, 200)

        def mappings(size: int) -> list[Mapping]:
            out, pos = [], 0
            while pos < size:
                length = rng.randrange(1, 30)
                kind = rng.random()
                if kind < 0.6:
                    out.append(Mapping(pos, length, rng.choice([0, 1000, 2000]) + pos))
                elif kind < 0.8:
                    out.append(Mapping(pos, length, None))
                pos += length
            return out

        a, b = mappings(size_a), mappings(size_b)

        def content(ms: list[Mapping], size: int, length: int) -> list[int | None]:
            data: list[int | None] = [None] * length
            for m in ms:
                for x in range(m.logical, min(m.end, size, length)):
                    data[x] = None if m.physical is None else m.physical + x - m.logical
            return data

        want = content(a, size_a, size_a)
        rebuilt = content(b, size_b, size_a)
        for offset, length in blockmap.differences(a, size_a, b, size_b):
            rebuilt[offset : offset + length] = want[offset : offset + length]
        assert rebuilt == want


def test_map_text_round_trips() -> None:
    ranges = [(0, 4096), (1 << 40, 512)]
    assert blockmap.text(ranges) == "0 4096\n1099511627776 512\n"
    assert blockmap.parse(blockmap.text(ranges)) == ranges


@pytest.mark.parametrize(
    "text",
    [
        "0 40965536\n131669 -409\n",  # found by the fuzzer: int() took the minus
        "1_0 5\n",
        "\u0661 5\n",  # an Arabic-Indic digit: int() takes it
        " 0 5\n",
        "0 5 7\n",
        "0\n",
    ],
)
def test_map_text_that_text_does_not_write_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="not OFFSET LENGTH"):
        blockmap.parse(text)
    assert blockmap.parse("") == []


THIN_DELTA = """\
<superblock uuid="" time="3" transaction="7" data_block_size="128" nr_data_blocks="64">
  <diff left="2" right="5">
    <same begin="0" length="10"/>
    <different begin="10" length="2"/>
    <left_only begin="12" length="1"/>
    <same begin="13" length="3"/>
    <right_only begin="16" length="4"/>
  </diff>
</superblock>
"""


def test_thin_delta_report_in_bytes() -> None:
    block = 128 * 512
    assert parse_thin_delta(THIN_DELTA) == [(10 * block, 3 * block), (16 * block, 4 * block)]
    with pytest.raises(Exception, match="not XML"):
        parse_thin_delta("thin_delta: bad")


@pytest.mark.parametrize(
    "report",
    [
        THIN_DELTA.replace('begin="10"', 'begin="-10"'),
        THIN_DELTA.replace('length="4"', 'length="4x"'),
        THIN_DELTA.replace('data_block_size="128"', 'data_block_size="1e3"'),
    ],
)
def test_thin_delta_report_with_bad_numbers_is_eio(report: str) -> None:
    with pytest.raises(EngineError) as refused:
        parse_thin_delta(report)
    assert refused.value.errno == errno.EIO


def _vm(ns: Namespace, vm_id: int, name: str, **kw: object) -> Vm:
    vm = Vm(vm_id, name, 0.0, **kw)  # type: ignore[arg-type]
    vm.volumes["root"] = Volume(vm_id * 10, "root", 1 << 20, "persistent", 0.0)
    ns.add_vm(vm)
    return vm


def test_lineage_relates_clones_versions_and_heads_not_strangers() -> None:
    ns = Namespace()
    v1 = _vm(ns, 1, "f-v1", version_of=3, version=1)
    v2 = _vm(ns, 2, "f-v2", origin_id=1, version_of=3, version=2)
    head = _vm(ns, 3, "f-next", origin_id=2)  # a head and its versions name each other
    web = _vm(ns, 4, "web", origin_id=2)
    sibling = _vm(ns, 5, "web2", origin_id=2)
    stranger = _vm(ns, 6, "stranger")
    for a, b in [(v1, head), (web, sibling), (web, v1), (head, web), (v2, v2)]:
        assert lineage.related(ns, a, b) and lineage.related(ns, b, a)
    assert not lineage.related(ns, web, stranger)
    with pytest.raises(ModelError) as info:
        lineage.comparable_volume(ns, web, web.volumes["root"], "stranger")
    assert info.value.errno == errno.ENOENT
    assert lineage.comparable_volume(ns, web, web.volumes["root"], "f-v1").id == 10
    saved = Volume(99, "root", 1 << 20, "persistent", 0.0)
    ns.add_savestate(4, Savestate(7, "monday", 0.0, "img", {}, {"root": saved}))
    assert lineage.comparable_volume(ns, sibling, sibling.volumes["root"], "web@monday").id == 99
    for bad in ("web@", "web@sunday", "@monday", "nobody"):
        with pytest.raises(ModelError):
            lineage.comparable_volume(ns, sibling, sibling.volumes["root"], bad)
