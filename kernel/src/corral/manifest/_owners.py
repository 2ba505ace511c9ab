"""Who checks the sections the kernel does not own: the installed drivers' section modules.

Without a running kernel, ``corral check`` asks the drivers the host enables (host config, else
every entry point of ``corral.drivers``) through their ``DriverDescription.sections``: it
imports each named ``corral.sdk.sections.Section`` (a cheap module) and runs it in this
process, without starting any driver. A running kernel asks its running drivers instead
(``manifest.check``, see ``corral.deploy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from corral.protocol import DriverDescription, ManifestCheck, ManifestChecked
from corral.sdk.sections import Section, check_sections, load_section, merge_checked

NAMESPACE = "corral.drivers"


@dataclass
class LocalOwners:
    """Section owners found among the installed drivers: section -> (driver, Section)."""

    sections: dict[str, tuple[str, Section]] = field(default_factory=dict)
    unchecked: dict[str, str] = field(default_factory=dict)  # driver -> why it cannot check

    def owners(self) -> dict[str, str]:
        """Section name -> the driver that owns it."""
        return {name: driver for name, (driver, _) in self.sections.items()}

    def check(self, args: ManifestCheck) -> ManifestChecked:
        """Check ``args.sections`` (all owned here), each by its owner."""
        out = ManifestChecked()
        for name, raw in args.sections.items():
            _driver, section = self.sections[name]
            merge_checked(out, check_sections(
                {name: section}, args.model_copy(update={"sections": {name: raw}})))
        return out

    @classmethod
    def installed(cls, config: Any | None = None) -> LocalOwners:
        """The owners among the drivers ``config`` (a HostConfig; default: this host's)
        enables. A driver started by command (``exec``) declares its sections in HELLO only:
        it is named in ``unchecked``."""
        if config is None:
            from corral.host import load_config

            config = load_config()
        found = {ep.name: ep for ep in entry_points(group=NAMESPACE)}
        owners = cls()
        wanted: dict[str, Any] = dict(config.drivers) or {name: None for name in sorted(found)}
        for name, dconf in wanted.items():
            if name in config.disabled:
                continue
            if dconf is not None and dconf.exec:
                owners.unchecked[name] = "started by command: its sections are checked " \
                    "through a running kernel"
                continue
            ep = found.get(dconf.entry_point if dconf and dconf.entry_point else name)
            if ep is None:
                continue
            try:
                desc = ep.load()
            except Exception as exc:
                owners.unchecked[name] = f"cannot load entry point: {type(exc).__name__}: {exc}"
                continue
            if not isinstance(desc, DriverDescription):
                continue
            for section, target in desc.sections.items():
                owners.sections[section] = (name, load_section(target))
        return owners

    def schemas(self) -> dict[str, Any]:
        """Section name -> JSON Schema of its value (for `corral schema`)."""
        return {name: section.adapter().json_schema()
                for name, (_d, section) in sorted(self.sections.items())}
