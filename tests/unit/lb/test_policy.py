"""Balancing policies, the kernel plane's slot table, config validation, HTTP framing helpers."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from corral.errors import ManifestError
from corral.units import parse_duration
from corral_lb.backend import Backend, BackendState, LatencyHistogram
from corral_lb.config import load_lb_config
from corral_lb.policy import (
    LeastConnections,
    Maglev,
    PowerOfTwoLeastRequest,
    RoundRobin,
    Weighted,
    make_policy,
    slot_table,
)


def backends(*weights: int) -> list[Backend]:
    return [Backend(id=f"b{i}", host="127.0.0.1", port=9000 + i, weight=w,
                    state=BackendState.HEALTHY) for i, w in enumerate(weights)]


def test_round_robin_is_even() -> None:
    """Round-robin gives each backend the same share, weights ignored."""
    bs = backends(1, 5, 1)
    rr = RoundRobin()
    counts = Counter(rr.pick(bs, None).id for _ in range(300))  # type: ignore[union-attr]
    assert counts == {"b0": 100, "b1": 100, "b2": 100}


def test_weighted_is_exactly_proportional_and_smooth() -> None:
    """Smooth weighted round-robin: exact shares per cycle, no run longer than needed."""
    bs = backends(5, 1, 1)
    w = Weighted()
    seq = [w.pick(bs, None).id for _ in range(7)]  # type: ignore[union-attr]
    assert Counter(seq) == {"b0": 5, "b1": 1, "b2": 1}
    assert seq[0] == "b0" and "b0b0b0b0" not in "".join(seq)


def test_least_connections_prefers_idle_relative_to_weight() -> None:
    """Least-connections picks the lowest active/weight."""
    bs = backends(1, 2, 1)
    bs[0].active, bs[1].active, bs[2].active = 3, 4, 5
    assert LeastConnections().pick(bs, None) is bs[1]  # 4/2 < 3/1


def test_p2c_avoids_the_loaded_backend() -> None:
    """Power of two choices never picks the most loaded of three when others are idle."""
    bs = backends(1, 1, 1)
    bs[2].outstanding = 100
    p = PowerOfTwoLeastRequest(random.Random(1))
    counts = Counter(p.pick(bs, None).id for _ in range(3000))  # type: ignore[union-attr]
    assert counts["b2"] == 0
    assert abs(counts["b0"] - counts["b1"]) < 300


def test_p2c_spreads_evenly_without_load() -> None:
    """With equal load p2c is uniform (within sampling error)."""
    bs = backends(1, 1, 1, 1)
    p = PowerOfTwoLeastRequest(random.Random(2))
    counts = Counter(p.pick(bs, None).id for _ in range(8000))  # type: ignore[union-attr]
    assert all(1700 < n < 2300 for n in counts.values()), counts


def test_maglev_spreads_keys_and_is_stable() -> None:
    """Maglev: the same key maps to the same backend; keys spread evenly."""
    bs = backends(1, 1, 1, 1)
    m = Maglev()
    keys = [f"10.0.{i // 256}.{i % 256}".encode() for i in range(4000)]
    first = {k: m.pick(bs, k).id for k in keys}  # type: ignore[union-attr]
    assert first == {k: m.pick(bs, k).id for k in keys}  # type: ignore[union-attr]
    counts = Counter(first.values())
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_maglev_removal_moves_only_the_removed_backends_keys() -> None:
    """Removing one backend remaps its keys and (almost) nothing else."""
    bs = backends(1, 1, 1, 1, 1)
    m = Maglev()
    keys = [f"user-{i}".encode() for i in range(5000)]
    before = {k: m.pick(bs, k).id for k in keys}  # type: ignore[union-attr]
    after = {k: m.pick(bs[:2] + bs[3:], k).id for k in keys}  # type: ignore[union-attr]
    moved_others = sum(1 for k in keys if before[k] != "b2" and before[k] != after[k])
    assert moved_others < 0.03 * len(keys), moved_others
    assert all(after[k] != "b2" for k in keys)


def test_maglev_honours_weights() -> None:
    """A backend of weight 3 owns about three times the keys of a weight-1 one."""
    bs = backends(3, 1)
    m = Maglev()
    counts = Counter(m.pick(bs, f"k{i}".encode()).id for i in range(8000))  # type: ignore[union-attr]
    assert 2.5 < counts["b0"] / counts["b1"] < 3.5, counts


def test_slot_table_proportional_and_interleaved() -> None:
    """The nft slot table holds 256 entries in proportion to weight, spread out."""
    bs = backends(3, 1)
    table = slot_table(bs, 256)
    assert len(table) == 256
    assert Counter(b.id for b in table) == {"b0": 192, "b1": 64}
    assert "b1b1" not in "".join(b.id for b in table)
    assert slot_table([], 256) == []
    assert {b.id for b in slot_table(backends(0, 2), 256)} == {"b1"}


def test_unknown_policy_is_refused() -> None:
    """make_policy names the valid policies."""
    with pytest.raises(ManifestError, match="round-robin"):
        make_policy("fastest")


def test_config_defaults_from_kernel_manifest() -> None:
    """None fields of the resolved manifest take lb defaults; name defaults to the app."""
    cfg = load_lb_config({"name": None, "frontend": 8080, "policy": "p2c", "health": None,
                          "activation": "always", "idle": None, "plane": None, "mode": "http",
                          "process": "web"}, app="shop")
    assert cfg.name == "shop" and cfg.listen == ("0.0.0.0", 8080) and cfg.plane == "proxy"
    assert cfg.health.http is None and cfg.health.tcp


def test_config_refuses_what_the_nft_plane_cannot_do() -> None:
    """The kernel plane is L4 without on-demand or per-request policies; errors say so."""
    with pytest.raises(ManifestError, match=r"needs plane = .proxy."):
        load_lb_config({"frontend": 80, "plane": "nft", "policy": "least-conn"}, app="a")
    with pytest.raises(ManifestError, match="L4 only"):
        load_lb_config({"frontend": 80, "plane": "nft", "mode": "http"}, app="a")
    with pytest.raises(ManifestError, match="on-demand"):
        load_lb_config({"frontend": 80, "plane": "nft", "activation": "on-demand"}, app="a")
    assert load_lb_config({"frontend": 80, "plane": "nft"}, app="a").policy_name == "weighted"


def test_durations() -> None:
    """Durations accept ms/s/m/h and bare seconds."""
    assert parse_duration("250ms") == 0.25
    assert parse_duration("5m") == 300
    assert parse_duration(2) == 2.0
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_histogram_quantiles() -> None:
    """The histogram reports bucket bounds for quantiles."""
    h = LatencyHistogram()
    for _ in range(99):
        h.observe(0.0004)
    h.observe(0.3)
    assert h.quantile(0.5) == 0.0005
    assert h.quantile(1.0) == 0.5
    assert h.snapshot()["count"] == 100
