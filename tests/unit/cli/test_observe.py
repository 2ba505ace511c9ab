"""``corral logs``/``errors``/``top`` of an app on several hosts: the answers merged."""

from __future__ import annotations

from typing import Any

from corral.cli._observe import _Tail, merge_error_groups, merge_records


def rec(t: int, instance: str, message: str = "m") -> dict[str, Any]:
    return {"time_ns": t, "instance": instance, "message": message}


def test_records_of_several_hosts_merge_in_time_order_marked_with_their_host() -> None:
    merged = merge_records({"h1": [rec(1, "web.1"), rec(5, "web.1")],
                            "h2": [rec(3, "web.2"), rec(5, "web.2")]}, 3)
    assert [(r["time_ns"], r["host"]) for r in merged] == [(3, "h2"), (5, "h1"), (5, "h2")]
    assert merge_records({"h1": [rec(1, "a")]}, 0) == []
    assert merge_records({}, 10) == []


def test_error_groups_merge_by_fingerprint() -> None:
    """Counts add up; the earliest first seen; the latest last seen brings its sample; the
    hosts are listed; the most frequent first."""
    h1 = [{"fingerprint": "f1", "count": 2, "first_seen": "2026-12-07T10:00:00Z",
           "last_seen": "2026-12-07T10:05:00Z", "sample": "old", "message": "boom"},
          {"fingerprint": "f2", "count": 1, "first_seen": "2026-12-07T09:00:00Z",
           "last_seen": "2026-12-07T09:00:00Z", "sample": "x"}]
    h2 = [{"fingerprint": "f1", "count": 3, "first_seen": "2026-12-07T10:01:00Z",
           "last_seen": "2026-12-07T10:09:00Z", "sample": "new", "message": "boom again"}]
    groups = merge_error_groups({"h1": h1, "h2": h2}, 10)
    assert [g["fingerprint"] for g in groups] == ["f1", "f2"]
    f1 = groups[0]
    assert (f1["count"], f1["first_seen"], f1["last_seen"], f1["sample"], f1["message"],
            f1["hosts"]) == (5, "2026-12-07T10:00:00Z", "2026-12-07T10:09:00Z", "new",
                             "boom again", ["h1", "h2"])
    assert groups[1]["hosts"] == ["h1"]
    assert h1[0]["count"] == 2  # the answers themselves are not changed
    assert len(merge_error_groups({"h1": h1, "h2": h2}, 1)) == 1


def test_a_followed_host_gives_each_record_once_also_at_the_same_instant() -> None:
    tail = _Tail([rec(10, "web.1", "a"), rec(10, "web.1", "b"), rec(4, "web.1")])
    assert tail.since({"app": "shop"})["since"] == 10 / 1e9 - 0.001  # a ms before
    # asked again from before the newest: what was shown is not shown again
    got = tail.fresh([rec(9, "web.1"), rec(10, "web.1", "a"), rec(10, "web.1", "c"),
                      rec(12, "web.1", "d")])
    assert [(r["time_ns"], r["message"]) for r in got] == [(10, "c"), (12, "d")]
    assert tail.fresh([rec(12, "web.1", "d"), rec(12, "web.1", "e")]) == [rec(12, "web.1", "e")]
    assert tail.fresh([]) == [] and tail.newest == 12
