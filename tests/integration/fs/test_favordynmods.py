"""``favordynmods``: the fs driver makes cgroup migrations cheap host-wide, keeping every other
option of the cgroup2 mount.

Each launch writes the new process into its cgroups; without ``favordynmods`` the first write
waits for an RCU grace period (8-15 ms measured on this host, bench/build.py prints it in the
build's ``process_s``). The option cannot be turned off in the kernel once on (the lock stays
in its slow-reader mode until reboot), so the root test removes it from the *mount options*
only, which is what lets it see the driver put it back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import require
from corral.protocol import Welcome
from corral.sdk import linux
from corral_fs._cgroups import FAVOR, Remount, favor_dynamic_changes, favor_remount
from corral_fs.driver import FsDriver

V2 = ("41 31 0:38 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 "
      "cgroup2 rw,nsdelegate,memory_recursiveprot")
V1 = "35 31 0:30 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids"


def test_remount_repeats_every_option_and_flag() -> None:
    found = favor_remount(f"{V1}\n{V2}\n")
    assert isinstance(found, Remount)
    assert found.target == Path("/sys/fs/cgroup")
    assert found.data == "nsdelegate,memory_recursiveprot,favordynmods"
    assert found.flags == (linux.MS_REMOUNT | linux.MS_NOSUID | linux.MS_NODEV
                           | linux.MS_NOEXEC | linux.MS_RELATIME)


def test_read_only_mount_stays_read_only() -> None:
    line = "41 31 0:38 / /sys/fs/cgroup ro,noatime - cgroup2 cgroup2 ro"
    found = favor_remount(line)
    assert isinstance(found, Remount)
    assert found.flags == linux.MS_REMOUNT | linux.MS_RDONLY | linux.MS_NOATIME
    assert found.data == FAVOR


def test_nothing_to_do() -> None:
    assert favor_remount(V2 + ",favordynmods") == "already set on /sys/fs/cgroup"
    assert favor_remount(V1) == "no cgroup2 hierarchy is mounted"
    assert favor_remount("") == "no cgroup2 hierarchy is mounted"


def _v2_options() -> tuple[str, list[str], list[str]] | None:
    """(target, mount flags, super options) of the first cgroup2 mount, or None."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, extra = left.split(), right.split()
            if len(extra) >= 3 and extra[0] == "cgroup2":
                return fields[4], fields[5].split(","), extra[2].split(",")
    return None


def _remove_favor(target: str, super_options: list[str]) -> None:
    """Remount without favordynmods (the kernel keeps the lock's mode; only the option goes)."""
    kept = [o for o in super_options if o not in ("rw", "ro", FAVOR)]
    flags = linux.MS_REMOUNT | linux.MS_RELATIME
    linux.mount(None, target, None, flags, ",".join(kept))


@pytest.fixture
def cgroup2() -> tuple[str, list[str], list[str]]:
    found = _v2_options()
    require(found is not None, "no cgroup2 hierarchy is mounted on this host")
    assert found is not None
    _target, flags, _options = found
    require(set(flags) <= {"rw", "relatime"},
            f"the cgroup2 mount has flags {flags} this test would not put back as they were")
    return found


@pytest.mark.root
def test_driver_sets_favordynmods_and_keeps_the_rest(
        cgroup2: tuple[str, list[str], list[str]]) -> None:
    target, _flags, options = cgroup2
    _remove_favor(target, options)
    try:
        without = _v2_options()
        assert without is not None and FAVOR not in without[2]

        off = FsDriver()
        off.welcomed(Welcome(peer_id="t", heartbeat_ms=1000, config={"favor_dynmods": False}))
        after_off = _v2_options()
        assert after_off is not None and FAVOR not in after_off[2]

        on = FsDriver()
        on.welcomed(Welcome(peer_id="t", heartbeat_ms=1000, config={}))
        after = _v2_options()
        assert after is not None
        assert after[0] == target and after[1] == without[1]
        assert set(after[2]) == set(without[2]) | {FAVOR}
        assert favor_dynamic_changes() == f"already set on {target}"
    finally:
        now = _v2_options()
        if now is not None and FAVOR not in now[2]:
            linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_RELATIME,
                        ",".join([o for o in now[2] if o not in ("rw", "ro")] + [FAVOR]))


def test_a_refused_remount_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The remount's failure reaches the caller as OSError (the driver logs it and goes on)."""
    def refused(*_a: object, **_k: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(linux, "mount", refused)
    monkeypatch.setattr("corral_fs._cgroups.favor_remount",
                        lambda _text: Remount(Path("/sys/fs/cgroup"), linux.MS_REMOUNT, FAVOR))
    with pytest.raises(PermissionError):
        favor_dynamic_changes()
    driver = FsDriver()
    driver.welcomed(Welcome(peer_id="t", heartbeat_ms=1000, config={}))  # logged, not raised
