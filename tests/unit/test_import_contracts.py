"""The import rules of pyproject.toml's [tool.importlinter] hold, and they can fail."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import corral

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# What a driver may import from corral (ARCHITECTURE.md §8, the brief's public surface).
PUBLIC = {"corral.sdk", "corral.protocol", "corral.errors", "corral.units", "corral.testing"}


def _config() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
        "importlinter"
    ]
    return config


def _contract(contract_id: str) -> dict[str, Any]:
    (found,) = [c for c in _config()["contracts"] if c.get("id") == contract_id]
    return found


def _lint(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_contracts_are_kept() -> None:
    """`lint-imports` keeps every contract of pyproject.toml on the tree as it is."""
    result = _lint()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_driver_contract_forbids_every_private_module() -> None:
    """The driver contract names every corral module outside the public surface: a new kernel
    module (or a new private module of corral.sdk or corral.protocol) must be listed."""
    forbidden = set(_contract("drivers-public-corral")["forbidden_modules"])
    private: set[str] = set()
    for info in pkgutil.iter_modules(corral.__path__, "corral."):
        if info.name not in PUBLIC:
            private.add(info.name)
        elif info.ispkg:
            package = __import__(info.name, fromlist=["__path__"])
            private.update(child.name for child in pkgutil.iter_modules(
                package.__path__, info.name + ".") if child.name.rsplit(".", 1)[1][0] == "_")
    assert forbidden == private, (
        f"not forbidden to drivers: {sorted(private - forbidden)}; "
        f"forbidden but not a private module: {sorted(forbidden - private)}"
    )
    assert not forbidden & PUBLIC


def _lab(tmp_path: Path, contract_id: str, source: str, imports: str
         ) -> subprocess.CompletedProcess[str]:
    """Run one contract of pyproject.toml with a stand-in driver ``corral_intruder`` (whose
    ``__init__`` is ``imports``) put in place of the real ``source`` package(s)."""
    package = tmp_path / "src" / "corral_intruder"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(imports)
    contract = dict(_contract(contract_id))
    for key in ("source_modules", "modules"):
        if key in contract:
            contract[key] = [m for m in contract[key] if m != source] + ["corral_intruder"]
    roots = [*_config()["root_packages"], "corral_intruder"]
    lines = ["[tool.importlinter]", f"root_packages = {roots!r}".replace("'", '"'), "",
             "[[tool.importlinter.contracts]]"]
    for key, value in contract.items():
        lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true"))
    config = tmp_path / "importlinter.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
    return _lint("--config", str(config), cwd=tmp_path, env=env)


def test_driver_reaching_into_the_kernel_breaks_the_contract(tmp_path: Path) -> None:
    """A driver importing corral.launch or corral.protocol._ops breaks the driver contract."""
    result = _lab(tmp_path, "drivers-public-corral", "corral_fs",
                  "from corral.launch import linux\nfrom corral.protocol._ops import StateSync\n")
    assert result.returncode != 0, result.stdout
    assert "corral_intruder -> corral.launch" in result.stdout
    assert "corral_intruder -> corral.protocol._ops" in result.stdout


def test_driver_importing_the_public_surface_keeps_the_contract(tmp_path: Path) -> None:
    """The same stand-in importing only public modules keeps it (the lab itself is sound)."""
    result = _lab(tmp_path, "drivers-public-corral", "corral_fs",
                  "from corral.sdk import linux\nfrom corral.protocol import StateSync\n"
                  "from corral.units import parse_size\n")
    assert result.returncode == 0, result.stdout + result.stderr


def test_driver_importing_another_driver_breaks_independence(tmp_path: Path) -> None:
    """A driver importing another driver breaks the independence contract."""
    result = _lab(tmp_path, "drivers-independent", "corral_fs", "import corral_net.pool\n")
    assert result.returncode != 0, result.stdout
    assert "corral_intruder" in result.stdout and "corral_net" in result.stdout
