"""The parts of a release without a kernel: which files go in, the fingerprint, the numbered
store (allocation, pruning, recovery after a crash), the config and secret store, what a build
runs and which Python it picks."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from corral.errors import CorralError, NotFoundError
from corral.host import BuildConfig
from corral.ledger import open_ledger
from corral.release import ConfigStore, ReleaseStore, build_plan, listing, snapshot
from corral.release._build import choose_python, matches

# ---- source ----------------------------------------------------------------------------------


def _tree(d: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return d


def test_listing_honours_gitignore_corralignore_and_never_ships_build_outputs(
        tmp_path: Path) -> None:
    d = _tree(tmp_path / "app", {
        "app.py": "x", "lib/util.py": "y", "notes.log": "z", "secret.env": "k",
        ".gitignore": "*.log\n", ".corralignore": "secret.env\n",
        ".venv/bin/python": "", "node_modules/x/index.js": "", "lib/__pycache__/u.pyc": "",
        "data/db.sqlite": "d"})
    names = listing(d, exclude=[d / "data"])
    assert names == [".corralignore", ".gitignore", "app.py", "lib/util.py"]


def test_listing_in_a_git_work_tree_takes_what_git_would(tmp_path: Path) -> None:
    d = _tree(tmp_path / "repo", {"app.py": "x", "build/out.bin": "b", ".gitignore": "build/\n",
                                   "new.py": "untracked but not ignored"})
    subprocess.run(["git", "init", "-q", str(d)], check=True)
    subprocess.run(["git", "-C", str(d), "add", "app.py", ".gitignore"], check=True)
    subprocess.run(["git", "-C", str(d), "-c", "user.email=t@t", "-c", "user.name=t",
                    "commit", "-qm", "one"], check=True)
    assert listing(d) == [".gitignore", "app.py", "new.py"]
    snap = snapshot(d)
    assert snap.commit and len(snap.commit) == 40 and snap.dirty is False
    (d / "app.py").write_text("changed")
    assert snapshot(d).dirty is True


def test_snapshot_copies_and_fingerprints_content_mode_and_links(tmp_path: Path) -> None:
    d = _tree(tmp_path / "app", {"run.sh": "#!/bin/sh\n", "a.txt": "a"})
    (d / "run.sh").chmod(0o755)
    (d / "link").symlink_to("a.txt")
    out = tmp_path / "out"
    snap = snapshot(d, out)
    assert snap.files == 3
    assert (out / "a.txt").read_text() == "a"
    assert os.readlink(out / "link") == "a.txt"
    assert stat.S_IMODE((out / "run.sh").stat().st_mode) == 0o755
    assert snapshot(d).digest == snap.digest  # the same source, the same fingerprint
    (d / "run.sh").chmod(0o644)
    assert snapshot(d).digest != snap.digest  # the executable bit is part of it
    (d / "run.sh").chmod(0o755)
    (d / "a.txt").write_text("b")
    assert snapshot(d).digest != snap.digest


# ---- store -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> ReleaseStore:
    return ReleaseStore(open_ledger("sqlite:", tmp_path), tmp_path, keep=3)


def test_releases_are_numbered_and_pruned_but_never_the_live_nor_the_one_before(
        store: ReleaseStore) -> None:
    for _ in range(6):
        n = store.allocate("shop", {"app": "shop", "files": ""})
        store.directory("shop", n).mkdir()
        store.update("shop", n, status="deployed", files=f"v{n}")
    assert [v["number"] for v in store.list("shop")] == [1, 2, 3, 4, 5, 6]
    removed = store.prune("shop", current=2)  # rolled back to v2: v1 is its predecessor
    assert removed == [3]
    assert [v["number"] for v in store.list("shop")] == [1, 2, 4, 5, 6]
    assert not store.directory("shop", 3).exists() and store.directory("shop", 4).exists()
    with pytest.raises(NotFoundError, match="no release v3"):
        store.get("shop", 3)


def test_a_release_sharing_files_keeps_them(store: ReleaseStore) -> None:
    """A config change makes a release of the same files: removing the older record must
    not remove the directory the newer one uses."""
    n1 = store.allocate("shop", {"app": "shop"})
    store.directory("shop", n1).mkdir()
    store.update("shop", n1, status="deployed", files="v1")
    n2 = store.allocate("shop", {"app": "shop", "files": "v1"})
    store.update("shop", n2, status="deployed")
    store.drop("shop", n1)
    assert store.directory("shop", 1).is_dir()


def test_recover_drops_unfinished_builds_and_stray_directories(store: ReleaseStore) -> None:
    done = store.allocate("shop", {"app": "shop"})
    store.directory("shop", done).mkdir()
    store.update("shop", done, status="built", files=f"v{done}")
    cut = store.allocate("shop", {"app": "shop"})
    store.directory("shop", cut).mkdir()
    store.update("shop", cut, files=f"v{cut}", builder={"pid": 1, "start_time": 0.0})
    (store.root("shop") / ".new-abc").mkdir()
    killed: list[dict[str, object]] = []
    gone = store.recover(killed.append)
    assert killed == [{"pid": 1, "start_time": 0.0}]
    assert "shop/v2" in gone and "shop/.new-abc" in gone
    assert [v["number"] for v in store.list("shop")] == [1]
    assert store.directory("shop", 1).is_dir() and not store.directory("shop", 2).exists()


# ---- config ----------------------------------------------------------------------------------


def test_secrets_are_stored_root_only_and_referenced_never_copied(tmp_path: Path) -> None:
    configs = ConfigStore(tmp_path)
    cfg = configs.with_set("shop", {"TOKEN": "s3cr3t"}, secret=True)
    cfg = configs.with_set("shop", {"GREETING": "hi"}, secret=False, base=cfg)
    configs.write("shop", cfg)
    assert cfg.masked() == {"GREETING": "hi", "TOKEN": "********"}
    assert "s3cr3t" not in json.dumps(cfg.as_json())
    assert "s3cr3t" not in (tmp_path / "config" / "shop.json").read_text()
    assert configs.secret_values("shop", cfg) == {"TOKEN": "s3cr3t"}
    ref = cfg.secrets["TOKEN"]
    f = tmp_path / "secrets" / "shop" / ref
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stat.S_IMODE(f.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "config" / "shop.json").stat().st_mode) == 0o600
    # a secret no release nor the desired config refers to any more is removed
    cfg2 = configs.without("shop", ["TOKEN"], cfg)
    configs.write("shop", cfg2)
    assert configs.prune("shop", keep=set()) == 1 and not f.exists()


@pytest.mark.parametrize("key", ["1A", "A-B", "", "PORT", "CORRAL_APP", "HOME", "A B"])
def test_config_keys_that_are_not_environment_names_are_refused(tmp_path: Path,
                                                                key: str) -> None:
    with pytest.raises(CorralError) as err:
        ConfigStore(tmp_path).with_set("shop", {key: "v"}, secret=False)
    assert repr(key) in err.value.reason


def test_unsetting_an_unknown_key_names_it(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no config NOPE"):
        ConfigStore(tmp_path).without("shop", ["NOPE"])


# ---- build -----------------------------------------------------------------------------------

PYTHONS = [("3.12.1", "/usr/local/bin/python3.12"), ("3.11.2", "/usr/bin/python3.11")]


def test_what_a_build_runs_by_the_files_present(tmp_path: Path) -> None:
    cfg = BuildConfig()
    rel = _tree(tmp_path / "r", {"uv.lock": "", "pyproject.toml": "[project]\nname='x'\n",
                                 "package.json": "{}", "package-lock.json": "{}"})
    plan = build_plan(rel, {}, cache=tmp_path / "c", config=cfg, pythons=PYTHONS)
    assert plan is not None and plan.kinds == ["uv", "npm"]
    assert "sync --frozen --no-install-project" in plan.steps[0].command
    assert plan.steps[1].command == "npm ci"
    assert set(plan.egress) == {"pypi.org:443", "files.pythonhosted.org:443",
                                "registry.npmjs.org:443"}
    assert plan.env["UV_LINK_MODE"] == "copy" and plan.env["UV_PYTHON_DOWNLOADS"] == "never"
    reqs = _tree(tmp_path / "q", {"requirements.txt": "flask\n"})
    plan = build_plan(reqs, {}, cache=tmp_path / "c", config=cfg, pythons=PYTHONS)
    assert plan is not None and plan.kinds == ["pip"] and len(plan.steps) == 2
    assert plan.egress == ["pypi.org:443", "files.pythonhosted.org:443"]
    node = _tree(tmp_path / "n", {"package.json": "{}"})
    plan = build_plan(node, {}, cache=tmp_path / "c", config=cfg, pythons=PYTHONS)
    assert plan is not None and plan.steps[0].command == "npm install"
    assert plan.egress == ["registry.npmjs.org:443", "files.pythonhosted.org:443"]
    assert build_plan(_tree(tmp_path / "e", {"app.py": ""}), {}, cache=tmp_path / "c",
                      config=cfg, pythons=PYTHONS) is None
    plan = build_plan(node, {"build": {"command": "make assets"}}, cache=tmp_path / "c",
                      config=cfg, pythons=PYTHONS)
    assert plan is not None and [s.command for s in plan.steps] == ["make assets"]


def test_the_build_script_stops_at_the_first_failing_step_and_names_it(tmp_path: Path) -> None:
    from corral.release import BuildPlan, Step

    plan = BuildPlan([Step("one", "echo 1"), Step("two", "exit 3"), Step("three", "echo 3")],
                     {}, [])
    r = subprocess.run(["sh", "-c", plan.script()], capture_output=True, text=True, check=False)
    assert r.returncode == 3
    # a step of several lines stops at its first failing line
    two = BuildPlan([Step("multi", "false\necho still-here")], {}, [])
    r2 = subprocess.run(["sh", "-c", two.script()], capture_output=True, text=True, check=False)
    assert r2.returncode == 1 and "still-here" not in r2.stdout
    assert r.stdout.splitlines() == ["-----> [1/3] one", "1", "-----> [2/3] two",
                                     "-----> failed: two (exit 3)"]


@pytest.mark.parametrize(("request_", "version", "ok"), [
    ("3.11", "3.11.2", True), ("3.11", "3.1.2", False), ("3.11.2", "3.11.2", True),
    ("3.11.3", "3.11.2", False), ("cpython-3.12", "3.12.1", True), (">=3.10,<3.12", "3.11.2",
                                                                    True),
    (">=3.12", "3.11.2", False)])
def test_python_requests(request_: str, version: str, ok: bool) -> None:
    assert matches(request_, version) is ok


def test_the_python_asked_for_or_a_clear_refusal(tmp_path: Path) -> None:
    cfg = BuildConfig()
    rel = _tree(tmp_path / "r", {".python-version": "# pinned\n3.11\n"})
    assert choose_python(rel, cfg, PYTHONS)[0] == "/usr/bin/python3.11"
    rel = _tree(tmp_path / "p", {"pyproject.toml": "[project]\nrequires-python = '>=3.12'\n"})
    assert choose_python(rel, cfg, PYTHONS)[0] == "/usr/local/bin/python3.12"
    rel = _tree(tmp_path / "x", {".python-version": "3.99\n"})
    with pytest.raises(CorralError) as err:
        choose_python(rel, cfg, PYTHONS)
    assert "3.99" in err.value.reason and "3.11.2" in err.value.reason
    assert "3.12.1" in err.value.reason
    mirrored = BuildConfig(python_mirror="https://mirror.example/python")
    assert choose_python(rel, mirrored, PYTHONS)[0] == "3.99"
    assert "mirror.example:443" in build_plan(
        _tree(tmp_path / "m", {".python-version": "3.99\n", "requirements.txt": ""}), {},
        cache=tmp_path / "c", config=mirrored, pythons=PYTHONS).egress  # type: ignore[union-attr]
