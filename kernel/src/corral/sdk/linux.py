"""Mount system calls for drivers that build host state (the fs driver's instance roots).

The calls themselves live in ``corral.launch.linux``, the one place that speaks to them; this
module is the public surface drivers import, so they never reach into the launch path."""

from corral.launch.linux import (
    MNT_DETACH,
    MS_BIND,
    MS_NOATIME,
    MS_NODEV,
    MS_NODIRATIME,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_RELATIME,
    MS_REMOUNT,
    MS_STRICTATIME,
    bind,
    mount,
    set_mount_attributes,
    umount2,
)

__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_NOATIME",
    "MS_NODEV",
    "MS_NODIRATIME",
    "MS_NOEXEC",
    "MS_NOSUID",
    "MS_PRIVATE",
    "MS_RDONLY",
    "MS_REC",
    "MS_RELATIME",
    "MS_REMOUNT",
    "MS_STRICTATIME",
    "bind",
    "mount",
    "set_mount_attributes",
    "umount2",
]
