"""Pure parts of the net driver: egress grammar, manifest grants, pool, rule building."""

from __future__ import annotations

import ipaddress

import pytest

from corral.errors import CorralError, ManifestError
from corral_net.config import NetConfig, instance_names
from corral_net.egress import parse_egress
from corral_net.model import DesiredState, InstanceNet, policy_from_manifest
from corral_net.pool import AddressPool, LocalSlotAllocator
from corral_net.ruleset import build, table_names

CONFIG = NetConfig(pool4=ipaddress.IPv4Network("10.231.0.0/16"),
                   pool6=ipaddress.IPv6Network("fd63:6f72:7261:1::/64"), resolvers=("10.0.0.53",))


@pytest.mark.parametrize(("text", "networks", "name", "ports"), [
    ("10.0.0.5/32:5432", ["10.0.0.5/32"], None, (5432, 5432)),
    ("10.0.0.0/8", ["10.0.0.0/8"], None, None),
    ("[2001:db8::/32]:443", ["2001:db8::/32"], None, (443, 443)),
    ("2001:db8::1", ["2001:db8::1/128"], None, None),
    ("api.example.com:443", [], "api.example.com", (443, 443)),
    ("db.test:8000-8010", [], "db.test", (8000, 8010)),
])
def test_egress_grammar(text: str, networks: list[str], name: str | None,
                        ports: tuple[int, int] | None) -> None:
    entry = parse_egress(text)
    assert [str(n) for n in entry.networks] == networks
    assert entry.name == name and entry.ports == ports


@pytest.mark.parametrize("text", ["10.0.0.5:99999", "[::1", "bad host:80", "a:b:c:d:x", "x:0"])
def test_bad_egress_names_the_entry(text: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_egress(text)
    assert text in str(info.value)


def test_resolved_manifest_form_is_accepted() -> None:
    policy = policy_from_manifest("shop", {
        "ports": {"http": 8100, "metrics": 9200},
        "network": {"interfaces": ["eth0"], "egress": [
            {"rule": "10.0.0.5/32:5432", "network": "10.0.0.5/32", "host": None, "port": 5432}]},
    })
    assert policy.ports == (8100, 9200) and policy.interfaces == ("eth0",)
    assert policy.egress[0].ports == (5432, 5432)


def test_bad_port_is_named() -> None:
    with pytest.raises(ManifestError, match=r"ports\.http"):
        policy_from_manifest("shop", {"ports": {"http": 0}})


def test_pool_slots_are_point_to_point_pairs() -> None:
    pool = AddressPool(CONFIG)
    addrs = pool.addresses(3)
    assert (str(addrs.gateway4), str(addrs.instance4)) == ("10.231.0.13", "10.231.0.14")
    assert str(addrs.instance6) == "fd63:6f72:7261:1::e"
    assert pool.slot_of("10.231.0.14") == 3 and pool.slot_of("192.0.2.1") is None
    allocator = LocalSlotAllocator(pool)
    assert [allocator.claim("a"), allocator.claim("b"), allocator.claim("a")] == [0, 1, 0]
    allocator.release("a")
    assert allocator.claim("c") == 0
    with pytest.raises(CorralError):
        allocator.adopt("d", 1)


def test_names_fit_the_kernel_limits() -> None:
    netns, link = instance_names(CONFIG, "a-very-long-app-name.web.12")
    assert len(link) <= 15 and netns.startswith("corral-a-very-long-app-name.web.12-")
    assert instance_names(CONFIG, "x/y") != instance_names(CONFIG, "x_y")


def _state(*apps: tuple[str, dict[str, object], int]) -> DesiredState:
    state = DesiredState()
    pool = AddressPool(CONFIG)
    slot = 0
    for name, manifest, count in apps:
        policy = policy_from_manifest(name, manifest)
        state.apps[name] = policy
        for index in range(count):
            ns, link = instance_names(CONFIG, f"{name}.web.{index}")
            state.instances[f"{name}.web.{index}"] = InstanceNet(
                f"{name}.web.{index}", name, ns, link, pool.addresses(slot),
                policy.ports[0] if policy.ports else None)
            slot += 1
    return state


def test_no_instances_means_no_tables() -> None:
    existing = {t: [] for t in table_names(CONFIG)}
    commands = build(CONFIG, DesiredState(), existing)  # type: ignore[arg-type]
    assert [c["delete"]["table"]["name"] for c in commands] == ["corral", "corral_nat",
                                                                "corral_nat"]
    assert build(CONFIG, DesiredState(), {}) == []


def test_reapply_flushes_and_deletes_only_what_is_gone() -> None:
    state = _state(("shop", {"ports": {"http": 8000}}, 2))
    existing = {("inet", "corral"): [{"chain": {"name": "out_blog"}},
                                     {"counter": {"name": "refused_blog"}},
                                     {"chain": {"name": "out_shop"}}]}
    commands = build(CONFIG, state, existing)  # type: ignore[arg-type]
    verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in commands]
    assert verbs[:2] == [("add", "table"), ("flush", "table")]
    deleted = [c["delete"] for c in commands if "delete" in c]
    assert deleted == [{"chain": {"family": "inet", "table": "corral", "name": "out_blog"}},
                       {"counter": {"family": "inet", "table": "corral", "name": "refused_blog"}}]
    # Nothing in the batch flushes or deletes a table corral does not own.
    for command in commands:
        for body in command.values():
            for obj in body.values():
                assert obj.get("table", obj.get("name")) in {"corral", "corral_nat"}


def test_two_instances_share_the_host_port_round_robin() -> None:
    commands = build(CONFIG, _state(("shop", {"ports": {"http": 8000}}, 2)), {})
    dnat = [c["add"]["rule"] for c in commands
            if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == "prerouting"
            and c["add"]["rule"]["family"] == "ip"]
    target = dnat[0]["expr"][-1]["dnat"]["addr"]
    assert target["map"]["key"]["numgen"]["mod"] == 2


def test_same_host_port_for_two_apps_is_a_conflict() -> None:
    state = _state(("a", {"ports": {"http": 8000}}, 1), ("b", {"ports": {"http": 8000}}, 1))
    with pytest.raises(CorralError, match="host port 8000"):
        build(CONFIG, state, {})
