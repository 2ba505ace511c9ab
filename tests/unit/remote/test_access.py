"""What an SSH key may ask of the kernel (``authorize``): one closed table, the key's scope,
the driver queries a scoped key may send, and the filters on the answers it gets.

The args are the validated pydantic objects the kernel hands to ``authorize``, built from the
operation's own model (``KERNEL_OPS["remote"]``)."""

from __future__ import annotations

from typing import Any

import pytest

from corral.errors import CorralError, ErrorCode
from corral.protocol import KERNEL_OPS
from corral.protocol._ops import Args, Deploy, DeployBranch, DriverQuery, GitSource, KeyAdd
from corral.remote import Key, authorize
from corral.remote._access import ADMIN, ANY, APP, QUERIES, RULES

SHOP = Key("dev", "ssh-ed25519", "AAAA", "SHA256:dev", apps=("shop",))
TWO = Key("ops", "ssh-ed25519", "AAAA", "SHA256:ops", apps=("blog", "shop"))
ADMIN_KEY = Key("root", "ssh-ed25519", "AAAA", "SHA256:root", admin=True)
TOKEN = "0123456789abcdef" * 2

# valid arguments of every remote op, for an app named {app}
_ARGS: dict[str, dict[str, Any]] = {
    "app.deploy": {"upload": TOKEN, "name": "{app}"},
    "app.down": {"name": "{app}"},
    "app.scale": {"name": "{app}", "counts": {"web": 2}},
    "app.ps": {},
    "app.get": {"name": "{app}"},
    "app.restart": {"name": "{app}"},
    "app.releases": {"name": "{app}"},
    "app.rollback": {"name": "{app}", "release": 3},
    "app.config": {"name": "{app}"},
    "app.config.set": {"name": "{app}", "vars": {"A": "1"}},
    "app.config.unset": {"name": "{app}", "keys": ["A"]},
    "app.run": {"name": "{app}", "command": ["sh"], "stdio": ["/dev/null"] * 3},
    "app.branch": {"name": "{app}", "branch": "release"},
    "keys.add": {"name": "eve", "key": "ssh-ed25519 AAAA", "apps": ["{app}"]},
    "keys.list": {},
    "keys.remove": {"name": "eve"},
    "keys.whoami": {},
    "ledger.list": {},
    "drivers.list": {},
    "driver.restart": {"name": "lb"},
    "driver.query": {"capability": "log", "query": "read", "args": {"app": "{app}"}},
    "kernel.status": {},
    "hosts.list": {},
    "hosts.forget": {"name": "h2"},
    "hosts.drain": {"name": "h2"},
}


def _fill(value: Any, app: str) -> Any:
    if isinstance(value, str):
        return value.replace("{app}", app)
    if isinstance(value, list):
        return [_fill(v, app) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, app) for k, v in value.items()}
    return value


def args_of(op: str, app: str = "shop", **extra: Any) -> Args:
    """``op``'s arguments validated by its own model, as the kernel hands them over."""
    model = KERNEL_OPS["remote"][op].args
    return model.model_validate({**_fill(_ARGS[op], app), **extra})


def query(capability: str, name: str, **args: Any) -> DriverQuery:
    return DriverQuery.model_validate({"capability": capability, "query": name, "args": args})


def refused(key: Key, op: str, args: Any) -> CorralError:
    with pytest.raises(CorralError) as exc:
        authorize(key, op, args)
    assert exc.value.code == ErrorCode.FORBIDDEN
    return exc.value


# ---- the table -------------------------------------------------------------------------------


def test_the_table_covers_exactly_the_remote_operations() -> None:
    """Every operation a remote peer may send has a rule, and the table names nothing else
    (a new remote operation must be decided here before a key can use it)."""
    assert set(RULES) == set(KERNEL_OPS["remote"])
    assert set(RULES.values()) <= {ADMIN, APP, ANY}
    assert set(_ARGS) == set(RULES)  # this file tests every one of them


def test_app_rules_read_the_name_the_operation_validates() -> None:
    """An APP rule reads ``args.name``: every APP operation's model has a validated
    ``name`` (an app name), so the rule cannot be dodged by leaving it out."""
    for op, rule in RULES.items():
        if rule == APP:
            assert "name" in KERNEL_OPS["remote"][op].args.model_fields, op
            assert args_of(op).name == "shop"  # type: ignore[attr-defined]


def test_the_rules_are_the_documented_ones() -> None:
    """The scope of each operation, as the module's docstring and `corral keys` explain."""
    assert {op for op, r in RULES.items() if r == ADMIN} == {
        "keys.add", "keys.list", "keys.remove", "ledger.list", "drivers.list",
        "driver.restart", "kernel.status", "hosts.list", "hosts.forget", "hosts.drain"}
    assert {op for op, r in RULES.items() if r == ANY} == {"app.ps", "keys.whoami",
                                                           "driver.query"}


@pytest.mark.parametrize("op", ["ledger.claim", "ledger.release", "instance.spawn",
                                "instance.stop", "event.publish", "socket.keep", "app.check",
                                "app.deploy2", "", "APP.DEPLOY"])
@pytest.mark.parametrize("key", [SHOP, ADMIN_KEY], ids=["scoped", "admin"])
def test_an_operation_outside_the_table_is_refused_to_every_key(op: str, key: Key) -> None:
    """Not in RULES: FORBIDDEN, for admin keys too."""
    assert "not allowed over SSH" in refused(key, op, None).reason


# ---- scoped and admin keys on every operation ------------------------------------------------


@pytest.mark.parametrize("op", sorted(RULES))
def test_an_admin_key_may_do_every_operation_unfiltered(op: str) -> None:
    """An admin key passes every rule (any app), and its answers are not filtered."""
    answer = {"apps": [{"app": "other"}], "services": [{"app": "other"}],
              "jobs": [{"job": "other.tick"}], "certs": [{"app": "other"}]}
    check = authorize(ADMIN_KEY, op, args_of(op, "other"))
    assert check(ADMIN_KEY, answer) == answer


@pytest.mark.parametrize("op", sorted(op for op, r in RULES.items() if r == ADMIN))
@pytest.mark.parametrize("key", [SHOP, TWO], ids=["one-app", "two-apps"])
def test_admin_operations_are_refused_to_scoped_keys(op: str, key: Key) -> None:
    """keys, ledger, drivers, kernel status: admin keys only."""
    assert "needs an admin key" in refused(key, op, args_of(op)).reason


@pytest.mark.parametrize("op", sorted(op for op, r in RULES.items() if r == APP))
def test_app_operations_on_the_keys_apps_are_allowed(op: str) -> None:
    """A scoped key may act on its own apps (each of them), answers unfiltered."""
    for app in ("blog", "shop"):
        answer = {"x": [1]}
        assert authorize(TWO, op, args_of(op, app))(TWO, answer) == answer


@pytest.mark.parametrize("op", sorted(op for op, r in RULES.items() if r == APP))
@pytest.mark.parametrize("app", ["other", "shop2", "sho", "blog"])
def test_app_operations_on_other_apps_are_refused(op: str, app: str) -> None:
    """Another app (also one whose name starts like the key's): FORBIDDEN."""
    err = refused(SHOP, op, args_of(op, app))
    assert f"may not act on app '{app}'" in err.reason


@pytest.mark.parametrize("op", sorted(op for op, r in RULES.items() if r == APP))
def test_an_app_operation_without_a_name_is_refused(op: str) -> None:
    """Args without a name (or an empty one) never pass an APP rule for a scoped key."""
    refused(SHOP, op, object())
    refused(SHOP, op, type("A", (), {"name": None})())
    refused(SHOP, op, type("A", (), {"name": ""})())


@pytest.mark.parametrize("key", [SHOP, ADMIN_KEY], ids=["scoped", "admin"])
def test_a_remote_deploy_never_names_a_host_directory(key: Key) -> None:
    """``directory`` set: FORBIDDEN even for an admin key (remote deploys send uploads)."""
    deploy = Deploy.model_validate({"directory": "/etc", "name": "shop"})
    assert "never a host directory" in refused(key, "app.deploy", deploy).reason


@pytest.mark.parametrize("key", [SHOP, ADMIN_KEY], ids=["scoped", "admin"])
def test_a_pushed_upload_deploys(key: Key) -> None:
    """A push's deploy (an upload and its git commit) to the key's app is allowed."""
    deploy = Deploy(upload=TOKEN, name="shop",
                    git=GitSource(commit="a" * 40, ref="refs/heads/main"))
    assert authorize(key, "app.deploy", deploy)(key, {"release": 2}) == {"release": 2}


def test_a_scoped_key_may_not_add_a_key_even_for_its_own_app() -> None:
    """keys.add is admin-only: a scoped key cannot mint a key (nor widen its scope)."""
    add = KeyAdd(name="eve", key="ssh-ed25519 AAAA", apps=["shop"])
    refused(SHOP, "keys.add", add)
    refused(SHOP, "keys.add", KeyAdd(name="eve", key="ssh-ed25519 AAAA", admin=True))


def test_the_deploy_branch_of_another_app_is_refused() -> None:
    """app.branch (reading or setting it) is the app's: refused for another app."""
    refused(SHOP, "app.branch", DeployBranch(name="other", branch="main"))
    refused(SHOP, "app.branch", DeployBranch(name="other"))
    assert authorize(SHOP, "app.branch", DeployBranch(name="shop"))(SHOP, {"b": 1}) == {"b": 1}


@pytest.mark.parametrize("op", ["keys.whoami", "app.ps"])
def test_every_key_may_ask_who_it_is_and_list_apps(op: str) -> None:
    """ANY operations are allowed to every key."""
    authorize(SHOP, op, args_of(op))


# ---- answers filtered to the key's apps ------------------------------------------------------


def test_app_ps_answers_with_the_keys_own_apps_only() -> None:
    """app.ps: the apps of other keys are left out; the rest of the answer is kept."""
    answer: dict[str, Any] = {
        "apps": [{"app": "shop", "state": "up"}, {"app": "other"}, {"app": "blog"},
                 {"app": "shop2"}, {"name": "no-app-field"}], "version": 1}
    assert authorize(SHOP, "app.ps", args_of("app.ps"))(SHOP, answer) == {
        "apps": [{"app": "shop", "state": "up"}], "version": 1}
    assert authorize(TWO, "app.ps", args_of("app.ps"))(TWO, answer)["apps"] == [
        {"app": "shop", "state": "up"}, {"app": "blog"}]
    assert answer["apps"][1] == {"app": "other"}  # the answer given is not changed in place


def test_app_ps_with_no_apps_is_an_empty_list() -> None:
    """No ``apps`` in the answer: an empty list, not an error."""
    assert authorize(SHOP, "app.ps", args_of("app.ps"))(SHOP, {}) == {"apps": []}


# ---- driver queries --------------------------------------------------------------------------


@pytest.mark.parametrize(("cap", "name"), [("log", "read"), ("log", "errors"), ("log", "top"),
                                           ("lb", "renew")])
def test_app_queries_need_one_of_the_keys_apps(cap: str, name: str) -> None:
    """Queries on one app's data: the key's app passes; another app, none, or a
    non-string app is FORBIDDEN."""
    answer = {"lines": ["x"]}
    assert authorize(SHOP, "driver.query", query(cap, name, app="shop"))(SHOP, answer) == answer
    for args in ({"app": "other"}, {}, {"app": ""}, {"app": None}, {"app": ["shop"]},
                 {"app": {"shop": 1}}, {"instance": "shop.web.1"}):
        refused(SHOP, "driver.query", query(cap, name, **args))


@pytest.mark.parametrize("name", ["next", "runs", "run", "show"])
def test_cron_job_queries_need_a_job_of_the_keys_apps(name: str) -> None:
    """cron job queries name ``<app>.<job>``: the key's app passes; another app, a bare
    job name (which the driver would look up across apps), an app prefix: FORBIDDEN."""
    assert authorize(SHOP, "driver.query", query("cron", name, job="shop.tick"))(
        SHOP, {"n": 1}) == {"n": 1}
    assert authorize(SHOP, "driver.query", query("cron", name, job="shop.a.b")) is not None
    for job in ("other.tick", "tick", "", ".tick", "shop", "shopping.tick", "Shop.tick"):
        refused(SHOP, "driver.query", query("cron", name, job=job))
    refused(SHOP, "driver.query", query("cron", name))
    refused(SHOP, "driver.query", query("cron", name, job=["shop.tick"]))


@pytest.mark.parametrize(("cap", "name"), [("fs", "anything"), ("log", "stats"),
                                           ("lb", "status"), ("lb", "stats"), ("net", "rules"),
                                           ("cron", "delete"), ("log", "read2")])
def test_queries_outside_the_list_need_an_admin_key(cap: str, name: str) -> None:
    """A query not in QUERIES: FORBIDDEN to scoped keys, whatever its args; allowed (and
    unfiltered) for admin keys."""
    assert (cap, name) not in QUERIES
    err = refused(SHOP, "driver.query", query(cap, name, app="shop"))
    assert "needs an admin key" in err.reason
    answer = {"services": [{"app": "other"}]}
    assert authorize(ADMIN_KEY, "driver.query", query(cap, name))(ADMIN_KEY, answer) == answer


def test_the_query_list_is_the_reviewed_one() -> None:
    """Widening QUERIES opens a driver query to every scoped key: the list is pinned."""
    assert set(QUERIES) == {("log", "read"), ("log", "errors"), ("log", "top"),
                            ("lb", "metrics"), ("lb", "certs"), ("lb", "renew"),
                            ("cron", "ls"), ("cron", "next"), ("cron", "runs"),
                            ("cron", "run"), ("cron", "show")}


def test_lb_metrics_leave_out_other_apps_services() -> None:
    """lb.metrics: any key may ask; the services of apps not its own are left out, and so
    are host-wide figures (the shared frontends' ``edge``)."""
    answer = {"services": [{"app": "shop", "backends": [1]}, {"app": "other"}, {"name": "x"},
                           {"app": "shop-admin"}, {"app": "blog"}], "edge": {"http": {}}}
    for args in ({}, {"app": "other"}, {"app": "shop"}):
        f = authorize(SHOP, "driver.query", query("lb", "metrics", **args))
        assert f(SHOP, answer) == {"services": [{"app": "shop", "backends": [1]}]}
    assert [s.get("app") for s in authorize(TWO, "driver.query", query("lb", "metrics"))(
        TWO, answer)["services"]] == ["shop", "blog"]
    assert authorize(SHOP, "driver.query", query("lb", "metrics"))(SHOP, {}) == {
        "services": []}


def test_lb_certs_leave_out_other_apps_certificates() -> None:
    """lb.certs: the certificates of apps not the key's are left out."""
    answer = {"certs": [{"app": "other", "domains": ["o.example"]},
                        {"app": "shop", "domains": ["shop.example"]}, {"domains": ["x"]}]}
    f = authorize(SHOP, "driver.query", query("lb", "certs", app="other"))
    assert f(SHOP, answer) == {"certs": [{"app": "shop", "domains": ["shop.example"]}]}


def test_cron_ls_leaves_out_other_apps_jobs() -> None:
    """cron.ls: jobs are ``<app>.<job>``; the jobs of apps not the key's are left out."""
    answer = {"jobs": [{"job": "shop.tick"}, {"job": "other.tick"}, {"job": "shopping.tick"},
                       {"job": "shop.nightly.x"}, {"name": "x"}, {"job": "blog.x"}],
              "scheduler": "ok"}
    f = authorize(SHOP, "driver.query", query("cron", "ls"))
    assert f(SHOP, answer) == {"jobs": [{"job": "shop.tick"}, {"job": "shop.nightly.x"}],
                               "scheduler": "ok"}
