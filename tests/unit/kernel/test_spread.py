"""Dealing a spread app's instances over hosts (corral.deploy._spread)."""

from __future__ import annotations

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
