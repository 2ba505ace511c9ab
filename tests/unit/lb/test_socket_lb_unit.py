"""corral_lb.socket_lb without the kernel: which frontends it takes, where cgroup v2 is, and
the program's shape (the kernel's verifier checks it for real in the integration tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral_lb.socket_lb import SocketBalancer as SB
from corral_lb.socket_lb import SocketLbUnavailable, cgroup2_root, program, value_size


def test_only_loopback_frontends_of_random_or_turn_policies_are_translated() -> None:
    assert SB.handles(("0.0.0.0", 8080), "weighted") == [("127.0.0.1", 8080)]
    assert SB.handles(("", 8080), "round-robin") == [("127.0.0.1", 8080)]
    assert SB.handles(("127.0.0.2", 81), "weighted") == [("127.0.0.2", 81)]
    assert SB.handles(("10.0.0.5", 80), "weighted") == []  # not loopback: DNAT
    assert SB.handles(("0.0.0.0", 80), "hash-source") == []  # same source from the host


def test_cgroup2_root_is_found_in_the_mount_table(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text("tmpfs /sys/fs/cgroup tmpfs ro 0 0\n"
                      "cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    assert cgroup2_root(hybrid) == Path("/sys/fs/cgroup/unified")
    unified = tmp_path / "unified"
    unified.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n")
    assert cgroup2_root(unified) == Path("/sys/fs/cgroup")
    v1 = tmp_path / "v1"
    v1.write_text("cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n")
    with pytest.raises(SocketLbUnavailable, match="no cgroup v2"):
        cgroup2_root(v1)


def test_program_shape() -> None:
    code = program(map_fd=7, netns_cookie=0x1122334455667788, slots=256)
    assert len(code) % 8 == 0 and len(code) // 8 == 35
    assert code[-8] == 0x95  # exit
    assert value_size(256) == 8 + 8 * 256
    with pytest.raises(ValueError, match="power of two"):
        program(map_fd=7, netns_cookie=1, slots=100)  # the pick masks with slots - 1
