"""Each section is checked by the driver that owns it; the kernel keeps no copy of its schema."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from manifest_support import MINIMAL, load_ok, located, only_problem, problems_of, write_app

from corral.host import HostConfig
from corral.manifest import LocalOwners, Manifest, load
from corral.protocol import DriverDescription, ManifestCheck
from corral.sdk.sections import Section, check_sections

WEB = MINIMAL + '[ports]\nhttp = 8000\n[processes]\nweb = { command = "x", port = "http" }\n'


def test_the_kernel_model_has_only_its_own_sections() -> None:
    """[app], [processes], [ports], [paths], [build], [release], [placement] are the
    kernel's; nothing else is modelled there."""
    assert set(Manifest.model_fields) == {"app", "processes", "ports", "paths", "build",
                                          "release", "placement"}


def test_installed_drivers_own_the_other_sections() -> None:
    """Each section's owner is the driver whose entry point description names it."""
    assert LocalOwners.installed(HostConfig()).owners() == {
        "network": "net", "limits": "fs", "logs": "log", "lb": "lb", "cron": "cron"}


def test_health_defaults_are_one_set(tmp_path: Path) -> None:
    """An [lb] without health resolves to the lb's own defaults (TCP, rise 1, fall 2): the
    manifest schema and the lb's runtime config are the same model."""
    from corral_lb import config, sections

    assert config.HealthConfig is sections.HealthConfig and config.LbConfig is sections.LbConfig
    resolved = load_ok(write_app(tmp_path, WEB + "[lb]\nfrontend = 80\n"))
    health = resolved.as_json()["lb"]["health"]
    assert health == {"http": None, "tcp": True, "interval": 2.0, "timeout": 1.0, "rise": 1,
                      "fall": 2}
    assert health == config.load_lb_config({"frontend": 80}, app="a").health.model_dump()
    assert resolved.as_json()["lb"]["name"] == "shop"  # the app's name by default


def test_cron_alert_events_are_one_set(tmp_path: Path) -> None:
    """An alert without `on` is on every event, as the cron driver schedules it."""
    from corral_cron import load_job

    resolved = load_ok(write_app(
        tmp_path, MINIMAL + '[cron.job]\nschedule = "@daily"\ncommand = "x"\n'
        '[cron.job.alert]\ncommand = "mail"\n'))
    alerts = resolved.as_json()["cron"]["job"]["alerts"]
    assert alerts["on"] == ["failure", "timeout", "missed", "no-success"]
    job = load_job("shop", "job", resolved.as_json()["cron"]["job"])
    assert list(job.alerts.on) == alerts["on"]


@pytest.mark.parametrize(("schedule", "said"), [
    ("*/30 * * * * *", "takes exactly 5"),
    ("0 0 * * * 2027", "takes exactly 5"),
    ("@reboot", "@reboot is not supported"),
])
def test_check_refuses_the_schedules_cron_refuses(tmp_path: Path, schedule: str,
                                                   said: str) -> None:
    """A schedule the cron driver would refuse at deploy is a located problem of the check."""
    app = write_app(tmp_path, MINIMAL + f'[cron.job]\nschedule = "{schedule}"\ncommand = "x"\n')
    problem = only_problem(app)
    assert problem.startswith(located(app, 4, "cron.job.schedule")), problem
    assert said in problem, problem


def test_hash_header_policy_resolves(tmp_path: Path) -> None:
    """policy = "hash-header" with hash_header is a valid [lb] (docs/drivers/lb.md)."""
    resolved = load_ok(write_app(tmp_path, WEB + '[lb]\nfrontend = 80\nmode = "http"\n'
                                 'policy = "hash-header"\nhash_header = "X-User"\n'))
    lb = resolved.as_json()["lb"]
    assert lb["policy"] == "hash-header" and lb["hash_header"] == "X-User"


def test_hash_header_needs_its_header_and_http(tmp_path: Path) -> None:
    """Without hash_header, or in tcp mode, hash-header is refused at lb.policy, located."""
    app = write_app(tmp_path, WEB + '[lb]\nfrontend = 80\npolicy = "hash-header"\n')
    problems = problems_of(app)
    assert len(problems) == 2, problems
    assert all(p.startswith(located(app, 9, "lb.policy")) for p in problems)
    assert "needs hash_header" in problems[0] and 'needs mode = "http"' in problems[1]


def test_a_section_no_enabled_driver_owns_is_refused(tmp_path: Path) -> None:
    """With the cron driver disabled on the host, [cron] is an error naming the section and
    the way to enable its driver."""
    app = write_app(tmp_path, MINIMAL + '[cron.job]\nschedule = "@daily"\ncommand = "x"\n')
    owners = LocalOwners.installed(HostConfig(disabled=["cron"]))
    with pytest.raises(Exception) as info:
        load(app, owners=owners)
    (problem,) = info.value.problems  # type: ignore[attr-defined]
    assert problem.startswith(located(app, 3, "cron")), problem
    assert "no enabled driver owns a [cron] section" in problem
    assert "enable the driver" in problem


def test_offset_moves_the_ports_an_owner_declares(tmp_path: Path) -> None:
    """--offset moves lb.frontend because the lb's Section says it is a port."""
    resolved = load_ok(write_app(tmp_path, WEB + "[lb]\nfrontend = 80\n"), offset=5)
    assert resolved.sections["lb"]["frontend"] == 85
    assert resolved.manifest.ports["http"] == 8005


def test_manifest_check_through_the_sdk_driver() -> None:
    """A Python driver with sections in its description declares them in HELLO and serves
    manifest.check from the description's Section, with located problems."""
    from corral.sdk import Driver

    class Probe(Driver):
        name = "probe"
        capability = "cron"
        description = DriverDescription(
            name="probe", capability="cron", version="1",
            sections={"cron": "corral_cron.sections:CRON"})

    driver = Probe()
    hello = driver.hello("t")
    assert hello.sections == ["cron"] and "manifest.check" in hello.ops
    args = ManifestCheck(app="a", directory="/", sections={
        "cron": {"ok": {"schedule": "@daily", "command": "x"},
                 "bad": {"schedule": "@reboot", "command": "x"}}})
    result: dict[str, Any] = asyncio.run(
        driver.handlers()["manifest.check"](args.model_dump(mode="json")))
    assert result["sections"] == {}
    assert [p["path"] for p in result["problems"]] == [["cron", "bad", "schedule"]]
    good = args.model_copy(update={"sections": {"cron": {"ok": {"schedule": "@daily",
                                                               "command": "x"}}}})
    result = asyncio.run(driver.handlers()["manifest.check"](good.model_dump(mode="json")))
    assert result["problems"] == [] and result["sections"]["cron"]["ok"]["kill_grace"] == 10.0


def test_check_sections_refuses_a_section_it_does_not_own() -> None:
    """Asked about a section it does not own, an owner answers a located problem."""
    out = check_sections({"x": Section("x", dict[str, int])},
                         ManifestCheck(app="a", directory="/", sections={"y": {}}))
    assert [p.path for p in out.problems] == [["y"]] and not out.sections
