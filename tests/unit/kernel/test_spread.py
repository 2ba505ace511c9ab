"""Dealing a spread app's instances over hosts (corral.deploy._spread)."""

from __future__ import annotations

from itertools import combinations

from hypothesis import given
from hypothesis import strategies as st

from corral.deploy._spread import (
    choose_hosts,
    deal,
    followed,
    joining,
    placement_key,
    split_placement_key,
    spread_of,
)


def test_instances_are_dealt_round_robin_and_hosts_without_any_are_left_out() -> None:
    assert deal({"web": 5, "worker": 1}, ["h1", "h2", "h3"]) == {
        "h1": {"web": [1, 4], "worker": [1]}, "h2": {"web": [2, 5]}, "h3": {"web": [3]}}
    assert deal({"web": 1}, ["h1", "h2"]) == {"h1": {"web": [1]}}
    assert deal({"web": 0}, ["h1"]) == {}


def test_the_home_comes_first_then_the_least_loaded_that_fit() -> None:
    fits = {"h2": 4, "h3": 1, "h4": 1}
    assert choose_hosts("h1", 3, fits, []) == ["h1", "h3", "h4"]
    assert choose_hosts("h1", 1, fits, []) == ["h1"]
    assert choose_hosts("h1", 9, fits, []) == ["h1", "h3", "h4", "h2"]  # all there are
    assert choose_hosts("h1", 3, {}, []) == ["h1"]


def test_a_redeploy_keeps_every_host_in_its_place() -> None:
    """Loads changed since the last deal: the same hosts in the same order."""
    fits = {"h2": 0, "h3": 9, "h4": 0}
    assert choose_hosts("h1", 3, fits, ["h1", "h3", "h2"]) == ["h1", "h3", "h2"]


def test_a_lost_host_s_place_goes_to_a_spare_and_no_other_share_moves() -> None:
    fits = {"h3": 0, "h4": 2, "h5": 1}  # h2 lost
    hosts = choose_hosts("h1", 3, fits, ["h1", "h2", "h3"])
    assert hosts == ["h1", "h5", "h3"]
    before = deal({"web": 6}, ["h1", "h2", "h3"])
    after = deal({"web": 6}, hosts)
    assert after["h1"] == before["h1"] and after["h3"] == before["h3"]
    assert after["h5"] == before["h2"]
    # no spare: h2's place is a hole, its instances go to the others; h3's stay
    places = choose_hosts("h1", 3, {"h3": 0}, ["h1", "h2", "h3"])
    assert places == ["h1", "h2", "h3"]
    dealt = deal({"web": 6}, places, live={"h1", "h3"})
    assert dealt == {"h1": {"web": [1, 2, 4]}, "h3": {"web": [3, 5, 6]}}
    assert dealt["h3"]["web"][:1] == before["h3"]["web"][:1]
    assert set(before["h3"]["web"]) <= set(dealt["h3"]["web"])  # h3 keeps what it ran


def test_a_new_home_keeps_the_other_hosts_and_fills_the_old_home_s_place() -> None:
    """h1 (home) lost, h3 adopts the app: h3 takes the home's place, h2 keeps its own (and
    its instances), a spare takes h3's old one."""
    fits = {"h2": 0, "h4": 0}
    hosts = choose_hosts("h3", 3, fits, ["h1", "h2", "h3"])
    assert hosts == ["h3", "h2", "h4"]
    assert deal({"web": 3}, hosts)["h2"] == deal({"web": 3}, ["h1", "h2", "h3"])["h2"]
    # with the last deal known, only the lost home's instances move (to the spare): h3
    # keeps its own, though round-robin over the new places would give it the old home's
    first = deal({"web": 6}, ["h1", "h2", "h3"])
    assert deal({"web": 6}, hosts, before=first) == {
        "h3": {"web": [3, 6]}, "h2": {"web": [2, 5]}, "h4": {"web": [1, 4]}}


def test_placement_keys_and_what_a_share_follows() -> None:
    assert placement_key("shop", "h2") == "shop/h2"
    assert split_placement_key("shop/h2") == ("shop", "h2")
    p = {"release": 3, "generation": 7, "share": {"web": [2]}, "force": ["web"], "home": "h1"}
    assert followed(p) == {"release": 3, "generation": 7, "share": {"web": [2]}}
    assert spread_of({"placement": {"spread": 3}}) == 3
    assert spread_of({}) is None and spread_of({"placement": {}}) is None  # every host


def test_a_host_that_joins_gets_a_share_when_the_app_asks_for_more_hosts() -> None:
    """Spread unset (every allowed host, ``want`` large): a host that joined is dealt a
    share; once it is among the places, nothing more happens."""
    assert joining(["h1", "h2"], [], 64, 6, ["h2", "h3"]) == ["h3"]
    assert joining(["h1", "h2", "h3"], [], 64, 6, ["h2", "h3"]) == []
    # a new place would run no instance: 2 instances on 2 places already
    assert joining(["h1", "h2"], [], 64, 2, ["h2", "h3"]) == []
    # spread = 2 reached: a third host joining gets nothing
    assert joining(["h1", "h2"], [], 2, 6, ["h2", "h3"]) == []
    # not spread (spread 1, or no cluster key): no places, nothing joins
    assert joining([], [], 64, 6, ["h2", "h3"]) == []
    # the app was dealt to its home alone (the only host then): the second host joins
    assert joining(["h1"], [], 64, 3, ["h2"]) == ["h2"]


def test_a_host_that_joins_takes_a_hole_even_at_the_app_s_spread() -> None:
    """spread = 2 on h1 and h2, h2 lost (its place a hole): h3 joining takes the place,
    which ``choose_hosts`` gives it."""
    assert joining(["h1", "h2"], ["h2"], 2, 6, ["h3"]) == ["h3"]
    assert choose_hosts("h1", 2, {"h3": 0}, ["h1", "h2"]) == ["h1", "h3"]


def test_a_host_joining_takes_instances_only_from_hosts_above_their_due() -> None:
    """4 instances on h1 and h2 (1, 3 | 2, 4), h3 joins: one instance moves, to h3; the
    round-robin deal over three places would have moved two (3 to h3 and 4 to h1)."""
    before = deal({"web": 4}, ["h1", "h2"])
    after = deal({"web": 4}, ["h1", "h2", "h3"], before=before)
    assert after == {"h1": {"web": [1, 3]}, "h2": {"web": [2]}, "h3": {"web": [4]}}
    assert deal({"web": 4}, ["h1", "h2", "h3"]) == {
        "h1": {"web": [1, 4]}, "h2": {"web": [2]}, "h3": {"web": [3]}}  # without ``before``


def test_a_redeploy_moves_nothing_and_a_hole_s_instances_come_back_to_it() -> None:
    places = ["h1", "h2", "h3"]
    first = deal({"web": 6, "worker": 2}, places)
    assert deal({"web": 6, "worker": 2}, places, before=first) == first
    holed = deal({"web": 6, "worker": 2}, places, live={"h1", "h2"}, before=first)
    assert holed == {"h1": {"web": [1, 3, 4], "worker": [1]},
                     "h2": {"web": [2, 5, 6], "worker": [2]}}
    back = deal({"web": 6, "worker": 2}, places, before=holed)
    assert back == first  # h3 gets back its own, 3 and 6; the others never moved


def test_scaling_keeps_running_instances_where_they_run() -> None:
    before = {"h1": {"web": [1, 2]}, "h2": {"web": [3]}}  # an uneven deal, kept as it is
    up = deal({"web": 5}, ["h1", "h2"], before=before)
    assert up == {"h1": {"web": [1, 2, 5]}, "h2": {"web": [3, 4]}}
    down = deal({"web": 2}, ["h1", "h2"], before=up)
    assert down == {"h1": {"web": [1]}, "h2": {"web": [2]}}  # 3..5 gone; 2 moves to h2
    # a damaged last deal giving one instance to two hosts: it runs once all the same
    twice = deal({"web": 2}, ["h1", "h2"], before={"h1": {"web": [1]}, "h2": {"web": [1]}})
    assert twice == {"h1": {"web": [1]}, "h2": {"web": [2]}}


@given(st.lists(st.integers(0, 9), min_size=1, max_size=3),
       st.lists(st.sampled_from(["h1", "h2", "h3", "h4", "h5"]), min_size=1, max_size=5,
                unique=True),
       st.lists(st.sampled_from(["h1", "h2", "h3", "h4", "h5"]), min_size=1, max_size=5,
                unique=True),
       st.sets(st.sampled_from(["h2", "h3", "h4", "h5"])))
def test_every_deal_is_balanced_whole_and_moves_no_more_than_it_must(
        counts: list[int], first: list[str], then: list[str], lost: set[str]) -> None:
    """Property: every instance runs on exactly one serving host; loads differ by at most
    one; an instance moves only off a host that is gone or above its due."""
    formation = {f"p{n}": c for n, c in enumerate(counts)}
    before = deal(formation, first)
    places = ["h1", *[h for h in then if h != "h1"]]
    live = {h for h in places if h not in lost}
    after = deal(formation, places, live=live, before=before)
    for process, count in formation.items():
        where = {i: h for h, share in after.items() for i in share.get(process, [])}
        assert sorted(where) == list(range(1, count + 1))
        assert set(where.values()) <= live
        loads = [len(after.get(h, {}).get(process, [])) for h in places if h in live]
        assert max(loads) - min(loads) <= 1
        moved = {i for i, h in where.items() if i not in before.get(h, {}).get(process, [])}
        serving = [h for h in places if h in live]
        ran = [len(before.get(h, {}).get(process, [])) for h in serving]
        base, extra = divmod(count, len(serving))
        fewest = min(sum(max(0, base + (k in plus) - r) for k, r in enumerate(ran))
                     for plus in combinations(range(len(serving)), extra))
        assert len(moved) == fewest  # every instance that moves had to
