"""The log cursor of the hub service (pure): parsing what clients send back, reading the kubelet's
``timestamps=true`` answers, and where each rank goes on from.

The answers here are written the way the kubelet writes them (``k8s.io/cri-client/pkg/logs``:
``RFC3339NanoFixed`` prefix and a space, one prefix per line, cut at ``limitBytes``);
the same code runs against kwok's real kubelet API in test_hub_logs.py.
"""

from __future__ import annotations

import pytest

from hubml.errors import InvalidRequest
from hubml.hub_ext import log_cursor as lc
from hubml.hub_ext.openapi import document

T0 = "2026-11-24T05:06:07"
S0 = lc.parse_timestamp(T0 + "Z")


def answer(*records: tuple[str, str]) -> bytes:
    """A ``timestamps=true`` answer: ``(fraction, text)`` pairs within second T0."""
    return "".join(f"{T0}.{frac}Z {text}\n" for frac, text in records).encode()


def test_timestamps_parse_to_nanoseconds_in_any_zone() -> None:
    assert lc.parse_timestamp("1970-01-01T00:00:01Z") == lc.NS
    assert lc.parse_timestamp("1970-01-01T00:00:01.000000001Z") == lc.NS + 1
    assert lc.parse_timestamp("1970-01-01T00:00:01.5Z") == lc.NS + 500_000_000
    assert lc.parse_timestamp("1970-01-01T02:00:01.000000000+02:00") == lc.NS
    for bad in ("", "yesterday", "2026-13-01T00:00:00Z", "2026-11-24 05:06:07Z", "2026-11-24T05:06:07",
                "2026-11-24T05:06:07Z\n",
                "\u0662026-11-24T05:06:07Z"):
        assert lc.parse_timestamp(bad) is None, bad
    assert lc.rfc3339_second(S0 // lc.NS) == T0 + "Z"
    assert lc.created_seconds(T0 + "Z") == S0 // lc.NS and lc.created_seconds(None) == 0


def test_stamped_lines_keep_only_what_is_complete() -> None:
    raw = answer(("000000001", "a"), ("000000002", "b b")) + f"{T0}.000000003Z hal".encode()
    lines = lc.stamped_lines(raw, final=False, truncated=False)
    assert [(x.at - S0, x.text) for x in lines] == [(1, "a"), (2, "b b")]
    assert lines[0].size == len(f"{T0}.000000001Z a\n")
    # the container ended: its last line needs no newline ...
    assert [x.text for x in lc.stamped_lines(raw, final=True, truncated=False)] == ["a", "b b", "hal"]
    # ... unless limitBytes cut the answer there
    assert [x.text for x in lc.stamped_lines(raw, final=True, truncated=True)] == ["a", "b b"]
    # progress bars and JSON stay one line as written; a line without a stamp takes the one before
    raw = answer(("1", "10%\r20%"), ("2", '{"loss": 0.5}')) + b"no stamp\n"
    assert [(x.at - S0, x.text) for x in lc.stamped_lines(raw, final=False, truncated=False)] == [
        (100_000_000, "10%\r20%"), (200_000_000, '{"loss": 0.5}'), (200_000_000, "no stamp")]


def test_advance_skips_what_the_boundary_second_repeats() -> None:
    start = lc.RankPosition("abc", 1)
    assert start.since is None
    first = lc.stamped_lines(answer(("1", "a"), ("1", "b"), ("2", "c")), final=False, truncated=False)
    new, pos = lc.advance(start, first[:2])
    assert new == ["a", "b"] and (pos.at, pos.count) == (S0 + 100_000_000, 2)
    assert pos.since == T0 + "Z" and pos.size == first[0].size + first[1].size
    # the next read (from the same second) repeats a and b: only c is new
    new, pos2 = lc.advance(pos, first)
    assert new == ["c"] and (pos2.at, pos2.count) == (S0 + 200_000_000, 1)
    assert lc.advance(pos2, first) == ([], pos2)
    # the same text again, same stamp: a new line, not a repeat
    again = lc.stamped_lines(answer(("1", "a"), ("1", "b"), ("2", "c"), ("2", "c")), final=False, truncated=False)
    assert lc.advance(pos2, again)[0] == ["c"]
    # the file was rotated away under the reader: what is stamped later is new
    rotated = lc.stamped_lines(answer(("3", "d")), final=False, truncated=False)
    assert lc.advance(pos2, rotated)[0] == ["d"]


def test_advance_counts_lines_when_there_are_no_timestamps() -> None:
    new, pos = lc.advance(lc.RankPosition("p", 1), lc.stamped_lines(b"x\ny\n", final=False, truncated=False))
    assert new == ["x", "y"] and (pos.at, pos.count, pos.since) == (0, 2, None)
    assert lc.advance(pos, lc.stamped_lines(b"x\ny\nz\n", final=False, truncated=False))[0] == ["z"]


def test_a_line_longer_than_any_read_is_cut_and_passed() -> None:
    pos = lc.RankPosition("p", 1)
    raw = f"{T0}.5Z ".encode() + b"x" * 100
    assert lc.advance(pos, lc.stamped_lines(raw, final=False, truncated=True)) == ([], pos)
    shown, after = lc.cut_line(raw, pos, 100)
    assert len(shown) == 1 and shown[0].startswith("x" * 100) and "line cut at 100 bytes" in shown[0]
    assert (after.at, after.count, after.since) == (S0 + lc.NS, 0, lc.rfc3339_second(S0 // lc.NS + 1))


def test_cursors_round_trip() -> None:
    positions = {0: lc.RankPosition("0a1b2c3d", 1764000000, S0 + 5, 3, 1200), 12: lc.RankPosition("f", 9)}
    text = lc.format_cursor(positions)
    assert lc.parse_cursor(text) == positions
    assert lc.parse_cursor("") == {} and lc.parse_cursor(None) == {}
    assert lc.pod_key("0A1B2C3D-4E5F-6789-abcd-ef0123456789") == "0a1b2c3d" and lc.pod_key("") == "0"
    # the largest job's cursor is accepted back
    biggest = {r: lc.RankPosition("0a1b2c3d", 9_999_999_999, 9_999_999_999_999_999_999, 999_999, 67_108_864)
               for r in range(lc.MAX_WORKERS)}
    assert lc.parse_cursor(lc.format_cursor(biggest)) == biggest
    # whatever a client claims, a read repeats a bounded part of the boundary second
    assert lc.RankPosition("p", 1, S0, 1, 10**12 - 1).reread == lc.MAX_REREAD_BYTES
    assert positions[0].reread == 1200


BAD_CURSORS = [
    "garbage", "0:12,1:5", "0.abc.1.2.3", "0.abc.1.2.3.4,", ",0.abc.1.2.3.4", "0.ABC.1.2.3.4",
    "0.abc.1.2.3.4,0.abd.1.2.3.4", "300.abc.1.2.3.4", "0.abc.1.99999999999999999999.3.4",
    "0.a-b.1.2.3.4", "0.abc.1.2.3.4 ", "0.abc.-1.2.3.4", "0.abcdefabc.1.2.3.4", "\u0660.abc.1.2.3.4",
    "0.abc.1.2.3.4\n",
    ",".join(f"{r}.abc.1.2.3.4" for r in range(256)) + ",0.abc.1.2.3.4" * 3000,
]


@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_bad_cursors_are_refused_with_the_way_out(cursor: str) -> None:
    with pytest.raises(InvalidRequest, match="cursor") as err:
        lc.parse_cursor(cursor)
    assert "next_cursor" in str(err.value)


def test_the_openapi_document_describes_the_cursor_the_code_accepts() -> None:
    import re

    doc = document()
    param = next(p for p in doc["paths"]["/jobs/{job_id}/logs"]["get"]["parameters"] if p["name"] == "cursor")
    assert param["schema"]["pattern"] == lc.CURSOR_PATTERN
    assert doc["components"]["schemas"]["LogChunk"]["properties"]["next_cursor"]["pattern"] == lc.CURSOR_PATTERN
    good = lc.format_cursor({3: lc.RankPosition("0a1b2c3d", 1764000000, S0, 1, 10)})
    assert re.match(param["schema"]["pattern"], good)
    assert not re.match(param["schema"]["pattern"], "0:12")
