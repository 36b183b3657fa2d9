"""The ``.vmtree/status`` format: one ``KEY: VALUE`` a line, whatever a value holds."""

from __future__ import annotations

import os

import pytest

from vmtreefs.rules import status


def test_plain_fields_read_as_before() -> None:
    text = status.render([("engine", "reflink"), ("pool_size", 20 << 30), ("inventory", "ok")])
    assert text == "engine: reflink\npool_size: 21474836480\ninventory: ok\n"
    assert dict(line.split(": ", 1) for line in text.splitlines())["inventory"] == "ok"


def test_a_value_with_a_newline_backslash_or_other_bytes_stays_one_line() -> None:
    source = os.fsdecode(b"/srv/a\nb\\c: d\xff")
    fields = [("engine_detail", f"reflink on XFS image {source}"), ("inventory", "ok")]
    text = status.render(fields)
    assert text.count("\n") == 2 and "\\012" in text and "\\134" in text and "\\377" in text
    text.encode("utf-8")
    assert status.parse(text) == fields


@pytest.mark.parametrize("text", ["engine reflink\n", "Engine: x\n", "a: b\x01\n", ": x\n"])
def test_what_render_does_not_write_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        status.parse(text)
