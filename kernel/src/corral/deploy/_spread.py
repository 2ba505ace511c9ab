"""One app's instances on several hosts at once: ``[placement] spread = N`` (docs/etcd.md).

On a shared ledger, the host an app is deployed on is its **home**: it holds the app's
cluster-wide records (name, lb names, domains, releases) and decides where each instance
runs. With ``spread = N`` (by default, with a cluster key, every host the app's placement
allows; without one, one host) it picks N hosts (itself first, then the live hosts the app's
``[placement]`` allows, those it placed on before kept in their places, then the least
loaded) and deals each process's instances round-robin over them (with three hosts,
``web`` 1, 4, 7 run on the first, 2, 5, 8 on the second and so on), and on each deal
after the first moves as few instances as it can (``deal``). Its own share it runs
as any deploy does; for each other host it writes a **placement** record (kind
``placement``, key ``<app>/<host>``, cluster-wide, every host lists them) in the same
transaction as its app record: the release, the instances that host runs, the generation.

A host that finds a placement naming it (``corral.cluster``) runs that share as a
**satellite** of the app: from its copy of the release (files and secret values copied by
``corral.replication``), holding only its own host's records (ports, paths, instances, an
app uid of its own) and a ``satellite`` record (per host) saying what it follows. When the
placement changes (a deploy, scale, restart, rollback or config change at home) it rolls
its share likewise; when the placement goes (``corral down`` at home, or the home moved the
share elsewhere) it takes its share down. When a satellite's host is lost, the home deals
its share to another host; when the home is lost, the host adopting the app becomes the
new home (a satellite of it there stops first) and deals the instances again. A host that
joins later (or comes to fit the app's placement) is dealt a share the same way, when the
app asks for more hosts than it has (``joining``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import cycle
from typing import Any

PLACEMENT = "placement"
"""A home's record of what another host runs of an app (cluster-wide: every host lists it)."""
SATELLITE = "satellite"
"""A host's record of the app share it runs for the app's home (per host)."""


def spread_of(manifest: Mapping[str, Any]) -> int | None:
    """How many hosts the app asks to run on at once (``[placement] spread``); None when it
    does not say: every host its placement allows, where releases are copied between hosts
    (a cluster key), else one."""
    raw = (manifest.get("placement") or {}).get("spread")
    return int(raw) if raw else None


def choose_hosts(home: str, spread: int, fits: Mapping[str, int], previous: Iterable[str]
                 ) -> list[str]:
    """The places an app's instances are dealt to, in order: ``home`` first, then up to
    ``spread - 1`` others among ``fits`` (the live hosts its placement allows -> their
    load). The hosts of ``previous`` (the places of its last deal) keep their places, so
    that a redeploy moves no share. A place whose host no longer fits (or the new home's
    old place: a new home takes the first) goes to the least loaded spare host; with no
    spare the place stays its host's, a **hole** (``deal`` gives its instances to the
    others until it comes back), so that the loss of one host moves only its share. Then
    the least loaded fill up."""
    before = list(previous)[1:]  # the first place is the home's, whichever host it is
    spare = sorted((h for h in fits if h != home and h not in before),
                   key=lambda h: (fits[h], h))
    chosen = [home]
    for host in before:
        if len(chosen) >= spread:
            break
        if host in chosen:
            continue
        if host != home and host in fits:
            chosen.append(host)
        elif spare:  # lost, no longer allowed, or the new home's old place
            chosen.append(spare.pop(0))
        elif host != home:
            chosen.append(host)  # a hole, until its host is back or a spare comes
    while len(chosen) < spread and spare:
        chosen.append(spare.pop(0))
    return chosen


def joining(places: Sequence[str], holes: Iterable[str], want: int, largest: int,
            fits: Iterable[str]) -> list[str]:
    """The hosts that joined since a spread app's last deal and that a deal now would give
    instances: those of ``fits`` (live hosts its placement allows, not drained) not among
    ``places`` (its last deal's), when it has a hole (``holes``: a lost host's place, which
    a spare host takes) or fewer places than it asks (``want``) and than its largest
    process has instances (``largest``: a new place runs one). Empty for an app that is not
    spread (no places)."""
    if not places:
        return []
    new = sorted(h for h in fits if h not in places)
    if not new or (not list(holes) and len(places) >= min(want, largest)):
        return []
    return new


def deal(formation: Mapping[str, int], places: list[str], live: Iterable[str] | None = None,
         before: Mapping[str, Mapping[str, Iterable[int]]] | None = None
         ) -> dict[str, dict[str, list[int]]]:
    """Each host's instances, moving as few as it can from ``before`` (the last deal: host
    -> process -> instance numbers; by default the round-robin one over ``places``).

    An instance's **own place** is the round-robin one: instance ``i`` (1-based) of every
    process belongs to place ``(i - 1) mod len(places)``. The instances of each process are
    balanced over the **serving** places (those whose host is ``live``; all are when
    ``live`` is None; the home's when none is): each gets ``count // len(serving)`` or one
    more, the one more going to those that ran most before. Each keeps what it ran before
    up to its due (its own instances first, then the lowest numbers); the rest (a hole's, a
    lost host's, those beyond a host's due, new ones) go to their own place when it is
    below its due, else in order, round-robin, to the places below theirs. So a host
    joining takes instances only from hosts above their due, a hole's instances go to the
    others and come back to it when its host does, and a redeploy moves none. Hosts left
    with none are absent."""
    up = set(places) if live is None else set(live)
    serving = [h for h in places if h in up] or places[:1]

    def own(index: int) -> str:
        return places[(index - 1) % len(places)]

    out: dict[str, dict[str, list[int]]] = {}
    for process, count in sorted(formation.items()):
        count = int(count)
        if before is None:
            ran = {h: [i for i in range(1, count + 1) if own(i) == h] for h in serving}
        else:
            ran = {h: _mine_first(h, {int(i) for i in (before.get(h) or {}).get(process, ())
                                      if 1 <= int(i) <= count}, own) for h in serving}
        base, extra = divmod(count, len(serving))
        by_ran = sorted(serving, key=lambda h: (-len(ran[h]), serving.index(h)))
        due = {h: base + (1 if rank < extra else 0) for rank, h in enumerate(by_ran)}
        kept: dict[str, list[int]] = {}
        placed: set[int] = set()
        for h in serving:  # (an instance a damaged ``before`` gives two hosts: the first's)
            kept[h] = [i for i in ran[h] if i not in placed][:due[h]]
            placed.update(kept[h])
        pool = []
        for index in range(1, count + 1):
            if index in placed:
                continue
            home = own(index)
            if home in kept and len(kept[home]) < due[home]:
                kept[home].append(index)
            else:
                pool.append(index)
        below = (h for h in cycle(serving) if len(kept[h]) < due[h])  # (dues sum to count)
        for index in pool:
            kept[next(below)].append(index)
        for host in serving:
            if kept[host]:
                out.setdefault(host, {})[process] = sorted(kept[host])
    return out


def _mine_first(host: str, ran: Iterable[int], own: Callable[[int], str]) -> list[int]:
    """The instances ``host`` ran, those whose own place is its first, each in order."""
    return sorted(ran, key=lambda i: (own(i) != host, i))


def share_of(placement: Mapping[str, Any]) -> dict[str, list[int]]:
    """The instances a placement gives its host: process -> instance numbers."""
    return {str(p): [int(i) for i in ix] for p, ix in (placement.get("share") or {}).items()}


def followed(placement: Mapping[str, Any]) -> dict[str, Any]:
    """What of a placement a satellite's share follows: a change of any of it is rolled."""
    return {k: placement.get(k) for k in ("release", "generation", "share")}


def placement_key(app: str, host: str) -> str:
    """The key of ``host``'s placement of ``app``."""
    return f"{app}/{host}"


def split_placement_key(key: str) -> tuple[str, str]:
    """(app, host) of a placement key."""
    app, _, host = key.rpartition("/")
    return app, host
