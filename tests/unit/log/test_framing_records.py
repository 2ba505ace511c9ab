"""Line framing, the stored text encoding and record structure."""

from __future__ import annotations

from corral_log.framing import LineFramer
from corral_log.records import Chunk, Record, decode_line, encode_lines, iso_ns, parse_iso_ns


def test_partial_line_waits_for_its_newline() -> None:
    """A chunk ending mid-line keeps the rest until the next chunk completes it."""
    f = LineFramer()
    assert f.feed(b"one\ntw") == ([b"one"], frozenset())
    assert f.feed(b"o\nthree\n") == ([b"two", b"three"], frozenset())
    assert f.pending == b""


def test_long_line_is_split_and_marked() -> None:
    """A line over the cap becomes pieces; every piece but the last is marked partial."""
    f = LineFramer(max_line=10)
    lines, partial = f.feed(b"a" * 25 + b"\nok\n")
    assert lines == [b"a" * 10, b"a" * 10, b"a" * 5, b"ok"]
    assert partial == {0, 1}


def test_long_unterminated_data_is_emitted_in_pieces() -> None:
    """Without a newline, data beyond the cap is emitted as partial pieces, not buffered."""
    f = LineFramer(max_line=8)
    lines, partial = f.feed(b"x" * 20)
    assert lines == [b"x" * 8, b"x" * 8] and partial == {0, 1}
    assert f.pending == b"x" * 4


def test_split_does_not_cut_a_utf8_character() -> None:
    """Pieces end on character boundaries, so each decodes cleanly."""
    f = LineFramer(max_line=5)
    lines, _ = f.feed("ééééé\n".encode())
    for piece in lines:
        piece.decode("utf-8")  # raises if a sequence was cut
    assert b"".join(lines) == "ééééé".encode()


def test_flush_final_vs_idle() -> None:
    """An unterminated rest is partial while the stream goes on, whole when it ended."""
    f = LineFramer()
    f.feed(b"prompt> ")
    assert f.flush(final=False) == ([b"prompt> "], frozenset({0}))
    f.feed(b"bye")
    assert f.flush(final=True) == ([b"bye"], frozenset())


def test_encoding_round_trip_and_json_fields() -> None:
    """Stored lines decode to the same records; JSON object lines get parsed ``fields``."""
    t = 1_700_000_000_123_456_789
    enc = encode_lines(
        "shop.web.1", "stderr", t, [b"plain", b'{"level":"warn","n":3}'], frozenset({0})
    )
    recs = Chunk("shop", enc).records()
    assert [r.message for r in recs] == ["plain", '{"level":"warn","n":3}']
    assert recs[0].partial and not recs[1].partial
    assert recs[1].fields == {"level": "warn", "n": 3}
    assert recs[0].fields is None
    d = recs[1].to_dict()
    assert d["process"] == "web" and d["stream"] == "stderr" and d["time_ns"] == t
    assert d["time"] == "2023-11-14T22:13:20.123456789Z"
    assert parse_iso_ns(iso_ns(t)) == t


def test_record_encode_matches_fast_path() -> None:
    """Record.encode and encode_lines produce the same bytes."""
    r = Record("a", "a.worker.2", "stdout", 5, "hello world")
    assert r.encode() == encode_lines("a.worker.2", "stdout", 5, [b"hello world"], frozenset())
    back = decode_line("a", r.encode().rstrip(b"\n"))
    assert back is not None and back.message == "hello world" and back.process == "worker"


def test_sinks_as_the_kernel_resolves_them() -> None:
    """parse_sinks accepts [logs] sinks exactly as the [logs] section's model dumps them."""
    from corral_log.sections import Logs
    from corral_log.sinks import parse_sinks

    m = Logs.model_validate(
        {
            "sinks": [
                {"type": "file", "path": "/var/log/shop.log", "rotate": "100MiB", "keep": 5},
                {"type": "syslog", "address": "udp://127.0.0.1:514", "format": "rfc3164"},
                {"type": "journald"},
                {
                    "type": "http",
                    "url": "http://127.0.0.1:3100/loki/api/v1/push",
                    "headers": {"X-Scope-OrgID": "t1"},
                    "batch": {"lines": 10, "bytes": "64KiB"},
                },
            ]
        }
    )
    specs = parse_sinks(m.model_dump(mode="json")["sinks"])
    assert [s.name for s in specs] == ["file-1", "syslog-2", "journald-3", "http-4"]
    http = specs[3]
    assert http.type == "http" and http.batch_bytes() == 64 << 10
