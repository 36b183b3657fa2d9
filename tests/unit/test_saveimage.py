"""Save image rewriting (vmtreefs.saveimage) on synthetic images built here.

The images follow libvirt 9.0's layout: a 92-byte header, the domain XML and the
migration cookie in ``data_len`` bytes, then a "stream" (random bytes here). The
real thing, restored by libvirt, is in tests/vm/test_saveimage_libvirt.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmtreefs import saveimage
from vmtreefs.errors import VmtreeError
from vmtreefs.saveimage import HEADER_SIZE, MAGIC, SaveHeader, read_header, rewrite_xml

XML = """<domain type='qemu'>
  <name>original</name>
  <uuid>871f2e85-1c57-49fc-92d6-8259ac8947b4</uuid>
</domain>
"""
COOKIE = b"<cookie>\n  <cpu mode='custom'/>\n  <slirpHelper/>\n</cookie>\n"
PADDING = 64 * 1024


def build(
    *,
    xml: bytes = XML.encode(),
    cookie: bytes | None = COOKIE,
    data_len: int | None = None,
    magic: bytes = MAGIC,
    version: int = 2,
    was_running: int = 1,
    compressed: int = 0,
    cookie_offset: int | None = None,
    unused: tuple[int, ...] = (0,) * 14,
    body: bytes = b"",
    pad: bool = True,
) -> bytes:
    """A save image as libvirt writes one: header, XML, cookie, zeros to data_len, body."""
    region = xml + b"\0" + (cookie + b"\0" if cookie is not None else b"")
    if data_len is None:
        data_len = len(region) + PADDING
    if cookie_offset is None:
        cookie_offset = len(xml) + 1 if cookie is not None else 0
    header = struct.pack(
        "<16s5I14I", magic, version, data_len, was_running, compressed, cookie_offset, *unused
    )
    assert len(header) == HEADER_SIZE
    region = region[:data_len]
    if pad:
        region += bytes(data_len - len(region))
    return header + region + body


def body_bytes(size: int = 3 << 20) -> bytes:
    """A "migration stream": starts like QEMU's, random after (so any shift shows)."""
    return b"QEVM\0\0\0\x03" + os.urandom(size - 8)


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def new_xml(name: str, extra: str = "") -> str:
    return XML.replace("original", name).replace("</domain>", f"{extra}</domain>")


def leftovers(directory: Path, *expected: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in expected)


# -- reading ------------------------------------------------------------------------


def test_read_header_reads_what_libvirt_writes(tmp_path: Path) -> None:
    image = write(tmp_path / "save.img", build(body=body_bytes(4096), was_running=1))
    header = read_header(image)
    assert header == SaveHeader(
        version=2,
        data_len=len(XML) + 1 + len(COOKIE) + 1 + PADDING,
        was_running=True,
        compressed=0,
        cookie_offset=len(XML) + 1,
        xml=XML,
        cookie=COOKIE,
    )
    assert header.stream_offset == HEADER_SIZE + header.data_len
    assert image.read_bytes()[header.stream_offset : header.stream_offset + 4] == b"QEVM"


def test_read_header_without_cookie(tmp_path: Path) -> None:
    image = write(tmp_path / "save.img", build(cookie=None, was_running=0, compressed=3))
    header = read_header(image)
    assert (header.cookie_offset, header.cookie, header.has_cookie) == (0, b"", False)
    assert (header.was_running, header.compressed, header.xml) == (False, 3, XML)


BAD_IMAGES: dict[str, bytes] = {
    "empty": b"",
    "short header": build()[:50],
    "other magic": build(magic=b"NotASaveImage!!!"),
    "incomplete (partial magic)": build(magic=b"LibvirtQemudPart"),
    "version 1": build(version=1),
    "version 3": build(version=3),
    "byte-swapped version": build(version=0x02000000),
    "data_len 0": build(data_len=0, cookie=None),
    "data_len past the end": build(data_len=1 << 20, pad=False),
    "data_len absurd": build(data_len=0xFFFFFFF0, pad=False),
    "cookieOffset past data_len": build(cookie_offset=1 << 17),
    "XML without NUL": build(xml=b"<domain>" + b"x" * 100, cookie=None, data_len=100),
    "cookie without NUL": build(data_len=len(XML) + 1 + 10),
    "not a domain": build(xml=b"<network/>"),
    "XML not UTF-8": build(xml=b"<domain>\xff\xfe</domain>"),
    "was_running 2": build(was_running=2),
    "unknown compression": build(compressed=9),
    "unused words set": build(unused=(0,) * 13 + (1,)),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_unknown_images_are_refused(tmp_path: Path, case: str) -> None:
    original = BAD_IMAGES[case] + body_bytes(4096)[: 4096 if len(BAD_IMAGES[case]) > 92 else 0]
    image = write(tmp_path / "save.img", original)
    with pytest.raises(VmtreeError) as read_error:
        read_header(image)
    assert read_error.value.errno == errno.EINVAL, read_error.value

    with pytest.raises(VmtreeError) as rewrite_error:
        rewrite_xml(image, tmp_path / "copy.img", new_xml("copy"))
    assert rewrite_error.value.errno == errno.EINVAL
    with pytest.raises(VmtreeError) as running_error:
        saveimage.set_running(image, False)
    assert running_error.value.errno == errno.EINVAL
    assert image.read_bytes() == original  # never touched
    assert leftovers(tmp_path, "save.img") == []  # no copy, no temporary


def test_a_missing_image_is_its_errno(tmp_path: Path) -> None:
    with pytest.raises(VmtreeError) as e:
        read_header(tmp_path / "nothing.img")
    assert e.value.errno == errno.ENOENT


# -- rewriting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "xml",
    [
        new_xml("shorter"),
        new_xml("a-much-longer-name", "  <description>" + "d" * 5000 + "</description>\n"),
        new_xml("unicode-é-名前"),
    ],
    ids=["shorter", "longer", "unicode"],
)
def test_rewrite_replaces_the_xml_and_keeps_everything_else(tmp_path: Path, xml: str) -> None:
    body = body_bytes()
    original = build(body=body)
    src = write(tmp_path / "save.img", original)
    before = read_header(src)

    made = rewrite_xml(src, tmp_path / "copy.img", xml)

    data = (tmp_path / "copy.img").read_bytes()
    after = read_header(tmp_path / "copy.img")
    assert after == made
    assert after.xml == xml
    assert after.cookie == COOKIE  # byte for byte
    encoded = xml.encode() + b"\0"
    assert after.cookie_offset == len(encoded)
    assert (after.version, after.data_len, after.was_running, after.compressed) == (
        before.version,
        before.data_len,
        before.was_running,
        before.compressed,
    )
    region = data[HEADER_SIZE : HEADER_SIZE + after.data_len]
    assert region == encoded + COOKIE + b"\0" + bytes(
        after.data_len - len(encoded) - len(COOKIE) - 1
    )
    assert data[:16] == MAGIC
    assert data[36:HEADER_SIZE] == bytes(HEADER_SIZE - 36)  # unused words stay zero
    assert len(data) == len(original)
    assert data[after.stream_offset :] == body  # the stream is untouched
    assert src.read_bytes() == original  # and so is the source
    assert stat.S_IMODE((tmp_path / "copy.img").stat().st_mode) == 0o600
    assert leftovers(tmp_path, "save.img", "copy.img") == []


def test_rewrite_of_an_image_without_cookie_writes_none(tmp_path: Path) -> None:
    body = body_bytes(1 << 16)
    src = write(tmp_path / "save.img", build(cookie=None, body=body))
    made = rewrite_xml(src, tmp_path / "copy.img", new_xml("copy"))
    assert (made.cookie_offset, made.cookie) == (0, b"")
    data = (tmp_path / "copy.img").read_bytes()
    assert data[32:36] == b"\0\0\0\0"
    encoded = new_xml("copy").encode() + b"\0"
    assert data[HEADER_SIZE : HEADER_SIZE + made.data_len].rstrip(b"\0") + b"\0" == encoded
    assert data[made.stream_offset :] == body


def test_rewrites_chain(tmp_path: Path) -> None:
    """A copy of a copy is as good as a copy: the header round-trips."""
    body = body_bytes(1 << 16)
    src = write(tmp_path / "a.img", build(body=body))
    rewrite_xml(
        src, tmp_path / "b.img", new_xml("b", "  <description>" + "x" * 9000 + "</description>\n")
    )
    rewrite_xml(tmp_path / "b.img", tmp_path / "c.img", new_xml("c"))
    c = read_header(tmp_path / "c.img")
    assert (c.xml, c.cookie) == (new_xml("c"), COOKIE)
    assert (tmp_path / "c.img").read_bytes()[c.stream_offset :] == body


def test_xml_that_does_not_fit_is_efbig(tmp_path: Path) -> None:
    original = build(body=body_bytes(1 << 16))
    src = write(tmp_path / "save.img", original)
    room = read_header(src).data_len - len(COOKIE) - 1  # for the XML and its NUL
    skeleton = new_xml("big", "<description></description>")
    fits = new_xml("big", "<description>" + "f" * (room - len(skeleton) - 1) + "</description>")
    assert len(fits.encode()) + 1 == room

    rewrite_xml(src, tmp_path / "fits.img", fits)  # exactly full: fine
    fitted = read_header(tmp_path / "fits.img")
    assert (fitted.xml, fitted.cookie) == (fits, COOKIE)

    too_big = fits.replace("<description>", "<description>f")
    with pytest.raises(VmtreeError) as e:
        rewrite_xml(src, tmp_path / "big.img", too_big)
    assert e.value.errno == errno.EFBIG
    assert src.read_bytes() == original
    assert leftovers(tmp_path, "save.img", "fits.img") == []


def test_an_existing_destination_is_never_overwritten(tmp_path: Path) -> None:
    src = write(tmp_path / "save.img", build(body=body_bytes(1 << 16)))
    dst = write(tmp_path / "copy.img", b"precious")
    with pytest.raises(VmtreeError) as e:
        rewrite_xml(src, dst, new_xml("copy"))
    assert e.value.errno == errno.EEXIST
    assert dst.read_bytes() == b"precious"
    assert leftovers(tmp_path, "save.img", "copy.img") == []


def test_a_destination_made_during_the_copy_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The early check can be raced; linking the finished copy into place cannot."""
    src = write(tmp_path / "save.img", build(body=body_bytes(1 << 16)))
    dst = tmp_path / "copy.img"
    real_link = os.link

    def link_after_someone_else(source: Path, target: Path) -> None:
        write(dst, b"someone else's")
        real_link(source, target)

    monkeypatch.setattr(os, "link", link_after_someone_else)
    with pytest.raises(VmtreeError) as e:
        rewrite_xml(src, dst, new_xml("copy"))
    assert e.value.errno == errno.EEXIST
    assert dst.read_bytes() == b"someone else's"
    assert leftovers(tmp_path, "save.img", "copy.img") == []


def test_a_nul_in_the_new_xml_is_refused(tmp_path: Path) -> None:
    src = write(tmp_path / "save.img", build())
    with pytest.raises(VmtreeError) as e:
        rewrite_xml(src, tmp_path / "copy.img", new_xml("a\0b"))
    assert e.value.errno == errno.EINVAL
    assert leftovers(tmp_path, "save.img") == []


# -- how the bytes are copied -------------------------------------------------------


def _no_reflink(*_args: object) -> None:
    raise OSError(errno.EOPNOTSUPP, "no reflink here")


def _no_copy_file_range(*_args: object) -> int:
    raise OSError(errno.EXDEV, "no copy_file_range here")


@pytest.mark.parametrize("fallback", ["copy_file_range", "read-write"])
def test_without_reflink_the_copy_keeps_the_body(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    monkeypatch.setattr(fcntl, "ioctl", _no_reflink)
    if fallback == "read-write":
        monkeypatch.setattr(os, "copy_file_range", _no_copy_file_range)
    body = body_bytes((5 << 20) + 123)  # several read-write chunks, an odd tail
    original = build(body=body)
    src = write(tmp_path / "save.img", original)
    made = rewrite_xml(src, tmp_path / "copy.img", new_xml("copy"))
    data = (tmp_path / "copy.img").read_bytes()
    assert len(data) == len(original)
    assert data[made.stream_offset :] == body


def test_clone_or_copy_reports_what_it_did(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path / "src", body_bytes(1 << 16))
    cloned: list[tuple[int, int]] = []

    def fake_clone(fd: int, request: int, arg: int) -> None:
        assert request == saveimage.FICLONE
        cloned.append((fd, arg))
        os.write(fd, src.read_bytes())

    monkeypatch.setattr(fcntl, "ioctl", fake_clone)
    with open(src, "rb") as s, open(tmp_path / "dst", "wb") as d:
        assert saveimage.clone_or_copy(s.fileno(), d.fileno()) is True
    assert cloned and (tmp_path / "dst").read_bytes() == src.read_bytes()

    monkeypatch.setattr(fcntl, "ioctl", _no_reflink)
    with open(src, "rb") as s, open(tmp_path / "dst2", "wb") as d:
        assert saveimage.clone_or_copy(s.fileno(), d.fileno()) is False
    assert (tmp_path / "dst2").read_bytes() == src.read_bytes()


def test_other_clone_errors_are_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object) -> None:
        raise OSError(errno.EIO, "disk on fire")

    monkeypatch.setattr(fcntl, "ioctl", broken)
    src = write(tmp_path / "save.img", build(body=body_bytes(1 << 16)))
    with pytest.raises(VmtreeError) as e:
        rewrite_xml(src, tmp_path / "copy.img", new_xml("copy"))
    assert e.value.errno == errno.EIO
    assert leftovers(tmp_path, "save.img") == []


# -- was_running --------------------------------------------------------------------


def test_set_running_changes_only_that_word(tmp_path: Path) -> None:
    original = build(body=body_bytes(1 << 16), was_running=1)
    image = write(tmp_path / "save.img", original)
    saveimage.set_running(image, False)
    data = image.read_bytes()
    assert read_header(image).was_running is False
    assert data[:24] + data[28:] == original[:24] + original[28:]
    saveimage.set_running(image, True)
    assert image.read_bytes() == original


# -- any XML, any cookie ------------------------------------------------------------

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\0"), max_size=300)


@settings(max_examples=60, deadline=None)
@given(old=_text, new=_text, cookie=st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"c")))
def test_round_trip_of_any_xml_and_cookie(old: str, new: str, cookie: bytes) -> None:
    body = b"QEVM" + bytes(range(256)) * 4
    with tempfile.TemporaryDirectory() as d:
        src = write(
            Path(d) / "save.img", build(xml=f"<domain>{old}".encode(), cookie=cookie, body=body)
        )
        made = rewrite_xml(src, Path(d) / "copy.img", f"<domain>{new}")
        again = read_header(Path(d) / "copy.img")
        assert again == made
        assert (again.xml, again.cookie) == (f"<domain>{new}", cookie)
        assert (Path(d) / "copy.img").read_bytes()[again.stream_offset :] == body
