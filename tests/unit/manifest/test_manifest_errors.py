"""Every class of bad input yields a ManifestError naming the file, the line and the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from manifest_support import MINIMAL, located, only_problem, problems_of, write_app

from corral.errors import ManifestError
from corral.manifest import load


def test_unknown_top_level_key(tmp_path: Path) -> None:
    """An unknown table is named with its line and the keys that are allowed."""
    app = write_app(tmp_path, MINIMAL + "\n[portz]\nhttp = 80\n")
    problem = only_problem(app)
    assert problem.startswith(located(app, 4, "portz"))
    assert "unknown key" in problem and "ports" in problem and "did you mean 'ports'" in problem


def test_unknown_nested_key(tmp_path: Path) -> None:
    """An unknown key inside an inline table is located on its own line."""
    app = write_app(
        tmp_path,
        MINIMAL
        + """
[ports]
http = 8000

[processes]
web = { command = "run", instances = 2, port = "http", replicas = 3 }
""",
    )
    problem = only_problem(app)
    assert problem.startswith(located(app, 8, "processes.web.replicas"))
    assert "expected one of: command, instances, port" in problem


def test_unknown_key_in_log_sink(tmp_path: Path) -> None:
    """Keys of a tagged union member are checked against that member (here: file)."""
    app = write_app(
        tmp_path,
        MINIMAL
        + """
[logs]
sinks = [
  { type = "journald" },
  { type = "file", path = "out.log", rotat = "1MiB" },
]
""",
    )
    problem = only_problem(app)
    assert problem.startswith(located(app, 7, "logs.sinks[1].rotat"))
    assert "did you mean 'rotate'" in problem


def test_wrong_type_names_expected_and_got(tmp_path: Path) -> None:
    """The brief's own example: ports.http = "eighty"."""
    app = write_app(tmp_path, MINIMAL + '\n[ports]\nmetrics = 9100\nhttp = "eighty"\n')
    problem = only_problem(app)
    assert problem == located(app, 6, "ports.http") + 'expected an integer 1..65535, got "eighty"'


@pytest.mark.parametrize(
    ("toml", "line", "field", "expected"),
    [
        ("[app]\nname = 5\n", 2, "app.name", "expected an app name"),
        ('[app]\nname = "Shop_1"\n', 2, "app.name", "DNS label"),
        (MINIMAL + '[limits]\ncpu = "two"\n', 4, "limits.cpu", "expected a number > 0"),
        (MINIMAL + "[limits]\nprocesses = true\n", 4, "limits.processes", "expected an integer"),
        (
            MINIMAL + '[paths]\nd = { path = "d", mode = "rwx" }\n',
            4,
            "paths.d.mode",
            '"ro" or "rw"',
        ),
        (
            MINIMAL + '[paths]\nd = { path = "d", create = "yes" }\n',
            4,
            "paths.d.create",
            "expected true or false",
        ),
        ("processes = 3\n" + MINIMAL, 1, "processes", "expected a table"),
        (MINIMAL + '[network]\negress = "10.0.0.0/8"\n', 4, "network.egress", "expected an array"),
        (MINIMAL + "[lb]\nfrontend = 80\npolicy = 3\n", 5, "lb.policy", "policy name"),
        (
            MINIMAL + "[lb]\nfrontend = 80\npolicy = { exec = [] }\n",
            5,
            "lb.policy.exec",
            "non-empty",
        ),
        (
            MINIMAL + '[cron.x]\nschedule = "@daily"\ncommand = "c"\noverlap = "never"\n',
            6,
            "cron.x.overlap",
            '"forbid"',
        ),
        (MINIMAL + '[logs]\nsinks = [{ path = "x" }]\n', 4, "logs.sinks[0]", "missing key 'type'"),
        (
            MINIMAL + '[logs]\nsinks = [{ type = "fax" }]\n',
            4,
            "logs.sinks[0]",
            'expected type = one of "file"',
        ),
        (
            MINIMAL + '[logs]\nsinks = [{ type = "syslog", address = "http://x" }]\n',
            4,
            "logs.sinks[0].address",
            "udp://",
        ),
        (
            MINIMAL + '[logs]\nsinks = [{ type = "http", url = "ftp://x" }]\n',
            4,
            "logs.sinks[0].url",
            "http://",
        ),
        (MINIMAL + "[ports]\nHTTP = 80\n", 4, "ports.HTTP", "lowercase"),
        (
            MINIMAL + '[cron.x]\nschedule = "@daily"\ncommand = "c"\nbackfill = 101\n',
            6,
            "cron.x.backfill",
            "expected an integer 1..100, got 101",
        ),
    ],
)
def test_wrong_types_and_values(
    tmp_path: Path, toml: str, line: int, field: str, expected: str
) -> None:
    """A wrong value names its line, its field and what was expected."""
    app = write_app(tmp_path, toml)
    problem = only_problem(app)
    assert problem.startswith(located(app, line, field)), problem
    assert expected in problem


def test_missing_required_keys(tmp_path: Path) -> None:
    """A missing key is reported on its table's line; a missing [app] on line 1."""
    app = write_app(tmp_path / "a", "[app]\n\n[ports]\nhttp = 1\n")
    assert only_problem(app) == located(app, 1, "app.name") + "required key is missing"
    app = write_app(tmp_path / "b", "[ports]\nhttp = 1\n")
    assert only_problem(app) == located(app, 1, "app") + "required table is missing"


def test_all_problems_reported_in_line_order(tmp_path: Path) -> None:
    """Several problems are all reported, sorted by line."""
    app = write_app(tmp_path, '[app]\nname = 1\n[limits]\nmemory = "x"\ncpu = 0\n')
    problems = problems_of(app)
    assert [p.split(":")[1] for p in problems] == ["2", "4", "5"]


def test_two_ports_equal_after_offset(tmp_path: Path) -> None:
    """Two equal ports are an error naming both, also once --offset moved them."""
    app = write_app(tmp_path, MINIMAL + "\n[ports]\nhttp = 8000\nadmin = 8000\n")
    problem = only_problem(app, offset=100)
    assert problem.startswith(located(app, 6, "ports.admin"))
    assert "port 8100 is also ports.http (line 5)" in problem


def test_lb_frontend_equal_to_a_port(tmp_path: Path) -> None:
    """lb.frontend is a port too: it may not repeat a [ports] entry."""
    app = write_app(
        tmp_path,
        MINIMAL + '[ports]\nhttp = 80\n[processes]\nweb = { command = "x", port = "http" }\n'
        "[lb]\nfrontend = 80\n",
    )
    problem = only_problem(app)
    assert problem.startswith(located(app, 8, "lb.frontend"))
    assert "ports.http" in problem


def test_port_out_of_range_after_offset(tmp_path: Path) -> None:
    """A port pushed out of 1..65535 by --offset names the port, the offset and the sum."""
    app = write_app(tmp_path, MINIMAL + "\n[ports]\nhttp = 8000\nhigh = 65500\n")
    problem = only_problem(app, offset=100)
    assert problem == located(app, 6, "ports.high") + (
        "expected a port 1..65535, got 65500 + --offset 100 = 65600"
    )


def test_negative_offset_below_one(tmp_path: Path) -> None:
    """A negative offset can push a port below 1, and lb.frontend moves too."""
    app = write_app(tmp_path, MINIMAL + "\n[ports]\nhttp = 8000\n\n[lb]\nfrontend = 80\n")
    problems = problems_of(app, offset=-100)
    assert any(
        p.startswith(located(app, 8, "lb.frontend")) and "80 + --offset -100 = -20" in p
        for p in problems
    ), problems


def test_process_naming_unknown_port(tmp_path: Path) -> None:
    """A process's port must name a [ports] entry; the error lists the known ones."""
    app = write_app(
        tmp_path,
        MINIMAL + '[ports]\nhttp = 8000\n[processes]\nweb = { command = "x", port = "htp" }\n',
    )
    problem = only_problem(app)
    assert problem == located(app, 6, "processes.web.port") + (
        'expected the name of a [ports] entry (http), got "htp"'
    )


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ('"2x"', "2x"),
        ('"10 minutes"', "10 minutes"),
        ("-1", "-1"),
        ('"1h30"', "1h30"),
        ("inf", "inf"),
    ],
)
def test_bad_duration(tmp_path: Path, value: str, why: str) -> None:
    """A bad duration says what a duration looks like."""
    app = write_app(
        tmp_path, MINIMAL + f'[cron.job]\nschedule = "@daily"\ncommand = "x"\ntimeout = {value}\n'
    )
    problem = only_problem(app)
    assert problem.startswith(located(app, 6, "cron.job.timeout"))
    assert 'expected a duration such as "500ms", "2s", "10m" or "1h30m"' in problem
    assert why in problem


@pytest.mark.parametrize("value", ['"512MeB"', '"lots"', "-5", '"1.5.2GiB"', "nan", "true", '"0"'])
def test_bad_size(tmp_path: Path, value: str) -> None:
    """A bad size says what a size looks like."""
    app = write_app(tmp_path, MINIMAL + f"[limits]\nmemory = {value}\n")
    problem = only_problem(app)
    assert problem.startswith(located(app, 4, "limits.memory"))
    assert 'expected a size such as "512MiB", "1GiB", "100MB"' in problem


def test_missing_file(tmp_path: Path) -> None:
    """A directory without corral.toml (nor Procfile) is a clear error naming the expected
    file."""
    (problem,) = problems_of(tmp_path)
    assert problem.startswith(
        f"{tmp_path.resolve() / 'corral.toml'}: no such file (expected the app's corral.toml there)"
    )


def test_missing_directory(tmp_path: Path) -> None:
    """A directory that does not exist at all: the same error, no other exception."""
    missing = tmp_path / "nope"
    problems = problems_of(missing)
    assert problems[0].startswith(f"{missing.resolve() / 'corral.toml'}: no such file")


def test_unreadable_file(tmp_path: Path) -> None:
    """A file the loader may not read is a clear error (as root: checked as user nobody)."""
    app = write_app(tmp_path, MINIMAL)
    (app / "corral.toml").chmod(0)
    expected = [f"{app.resolve() / 'corral.toml'}: cannot read: Permission denied"]
    if os.geteuid() != 0:
        assert problems_of(app) == expected
        return
    # root reads anything: check in a forked child that has become nobody. The interpreter
    # and corral are already loaded, so the child needs no access to the venv.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                load(app)
            except ManifestError as exc:
                os.write(write_end, "\n".join(exc.problems).encode())
                status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        reported = reader.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child raised no ManifestError"
    assert reported.splitlines() == expected


def test_manifest_is_a_directory(tmp_path: Path) -> None:
    """corral.toml being a directory is a clear error."""
    (tmp_path / "corral.toml").mkdir()
    assert problems_of(tmp_path) == [
        f"{tmp_path.resolve() / 'corral.toml'}: is a directory, expected a file"
    ]


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 names the line of the bad byte."""
    app = write_app(tmp_path, MINIMAL)
    (app / "corral.toml").write_bytes(b'[app]\nname = "sh\xffop"\n')
    assert problems_of(app) == [
        f"{app.resolve() / 'corral.toml'}:2: expected UTF-8 text, got byte 0xff"
    ]


def test_toml_syntax_error(tmp_path: Path) -> None:
    """A TOML syntax error gives tomllib's line and column."""
    app = write_app(tmp_path, MINIMAL + "[ports]\nhttp = = 80\n")
    assert problems_of(app) == [
        f"{app.resolve() / 'corral.toml'}:4:8: TOML syntax error: Invalid value"
    ]


def test_toml_syntax_error_at_end(tmp_path: Path) -> None:
    """An error at the end of the document points at the last line."""
    app = write_app(tmp_path, MINIMAL + "[network]\negress = [\n")
    (problem,) = problems_of(app)
    assert problem.startswith(f"{app.resolve() / 'corral.toml'}:5: TOML syntax error:")


def test_procfile_conflict(tmp_path: Path) -> None:
    """A process defined in both corral.toml and the Procfile names both places."""
    app = write_app(
        tmp_path,
        MINIMAL + '[processes]\nweb = { command = "a" }\n',
        procfile="worker: python worker.py\nweb: gunicorn app\n",
    )
    problem = only_problem(app)
    assert problem == (
        f"{app.resolve() / 'Procfile'}:2: processes.web: defined both in Procfile and in "
        f"{app.resolve() / 'corral.toml'}:4; define each process in one place"
    )


def test_procfile_bad_line_and_duplicate(tmp_path: Path) -> None:
    """Procfile lines that are not `name: command`, or repeat a name, are located."""
    app = write_app(tmp_path, MINIMAL, procfile="# comment\nweb python app.py\nw: a\nw: b\n")
    procfile = app.resolve() / "Procfile"
    assert problems_of(app) == [
        f'{procfile}:2: expected "name: command", e.g. "web: python app.py"',
        f"{procfile}:4: process 'w' is already defined on line 3",
    ]


def test_procfile_value_error_located_in_procfile(tmp_path: Path) -> None:
    """A bad process name from the Procfile is reported at the Procfile's line."""
    app = write_app(tmp_path, MINIMAL, procfile="\nWeb: python app.py\n")
    problem = only_problem(app)
    assert problem.startswith(f"{app.resolve() / 'Procfile'}:2: processes.Web: ")


@pytest.mark.parametrize(
    "item", ["ports.http", "=9000", "ports..http=1", "ports.http x=1", 'ports."unterminated=1']
)
def test_bad_set_syntax(tmp_path: Path, item: str) -> None:
    """A malformed --set names the flag as typed and the expected form."""
    app = write_app(tmp_path, MINIMAL)
    problem = only_problem(app, set_=[item])
    assert problem.startswith(f"{app.resolve() / 'corral.toml'} (--set {item}): expected KEY=VALUE")


def test_set_through_a_value(tmp_path: Path) -> None:
    """--set cannot descend into a value that is not a table."""
    app = write_app(tmp_path, MINIMAL)
    problem = only_problem(app, set_=["app.name.x=1"])
    assert problem == (
        f"{app.resolve() / 'corral.toml'} (--set app.name.x=1): app.name is not a table, "
        "or is an array without element x"
    )


def test_set_value_error_names_the_override(tmp_path: Path) -> None:
    """A bad value given by --set names the override instead of a line."""
    app = write_app(tmp_path, MINIMAL + "[ports]\nhttp = 8000\n")
    problem = only_problem(app, set_=["ports.http=eighty"])
    assert problem == (
        f"{app.resolve() / 'corral.toml'} (--set ports.http=eighty): ports.http: "
        'expected an integer 1..65535, got "eighty"'
    )


def test_set_unknown_key_names_the_override(tmp_path: Path) -> None:
    """An unknown key introduced by --set is blamed on the override, not on line 1."""
    app = write_app(tmp_path, MINIMAL)
    problem = only_problem(app, set_=["limits.ram=1GiB"])
    assert problem.startswith(
        f"{app.resolve() / 'corral.toml'} (--set limits.ram=1GiB): limits.ram: unknown key"
    )


@pytest.mark.parametrize("item", ["NOEQUALS", "1BAD=x", "PORT=1", "CORRAL_APP=x", "A-B=c"])
def test_bad_env(tmp_path: Path, item: str) -> None:
    """--env needs KEY=VALUE and may not shadow the contract's variables."""
    app = write_app(tmp_path, MINIMAL)
    problem = only_problem(app, env=[item])
    assert problem.startswith(f"{app.resolve() / 'corral.toml'} (--env {item}): ")


@pytest.mark.parametrize("zone", ["Mars/Olympus", "localtime", "../etc/passwd", "utc ", ""])
def test_bad_timezone(tmp_path: Path, zone: str) -> None:
    """A cron timezone must be an IANA name."""
    app = write_app(
        tmp_path, MINIMAL + f'[cron.job]\nschedule = "@daily"\ntimezone = "{zone}"\ncommand = "x"\n'
    )
    problem = only_problem(app)
    assert problem.startswith(located(app, 5, "cron.job.timezone"))
    assert "expected an IANA timezone name" in problem


@pytest.mark.parametrize(
    ("rule", "hint"),
    [
        ("10.0.0.5/24", "did you mean 10.0.0.0/24?"),
        ("api.example.com", "a host name needs a port"),
        ("10.0.0.5:99999", "the port must be 1..65535"),
        ("10.0.0.256:80", ""),
        ("[10.0.0.1]:80", "brackets hold an IPv6"),
        ("2001:db8::/32:443", ""),
        ("exa mple.com:80", ""),
        ("", ""),
    ],
)
def test_bad_egress(tmp_path: Path, rule: str, hint: str) -> None:
    """Egress rules are CIDR[:port], host:port or [v6]:port."""
    app = write_app(tmp_path, MINIMAL + f'[network]\negress = [\n  "1.2.3.4/32",\n  "{rule}",\n]\n')
    problem = only_problem(app)
    assert problem.startswith(located(app, 6, "network.egress[1]"))
    assert 'expected "CIDR[:port]", "host:port" or "[IPv6 CIDR]:port"' in problem
    assert hint in problem


def test_lb_rules(tmp_path: Path) -> None:
    """lb: http mode needs the proxy plane, idle needs on-demand, health needs one check."""
    app = write_app(
        tmp_path,
        MINIMAL
        + """[ports]
http = 8000
[processes]
web = { command = "x", port = "http" }
[lb]
frontend = 80
mode = "http"
plane = "nft"
idle = "5m"
health = { interval = "1s", tcp = false }
""",
    )
    problems = problems_of(app)
    assert len(problems) == 3, problems
    assert problems[0].startswith(located(app, 9, "lb.mode"))
    assert 'use plane = "proxy" for mode = "http"' in problems[0]
    assert problems[1].startswith(located(app, 11, "lb.idle"))
    assert problems[2] == located(app, 12, "lb.health") + (
        'expected a check: http = "/path" or tcp = true'
    )


def test_lb_needs_a_process_with_a_port(tmp_path: Path) -> None:
    """Without a process that has a port, the lb has nothing to send traffic to."""
    app = write_app(tmp_path, MINIMAL + '[processes]\nw = { command = "x" }\n[lb]\nfrontend = 80\n')
    problem = only_problem(app)
    assert problem.startswith(located(app, 5, "lb"))
    assert "expected one process with a port" in problem


def test_cron_alert_no_success_needs_a_window(tmp_path: Path) -> None:
    """alert.on = ["no-success"] needs no_success_within."""
    app = write_app(
        tmp_path,
        MINIMAL
        + '[cron.job]\nschedule = "@daily"\ncommand = "x"\n'
        + '[cron.job.alert]\ncommand = "mail"\non = ["failure", "no-success"]\n',
    )
    problem = only_problem(app)
    assert problem.startswith(located(app, 8, "cron.job.alert.on"))


def test_port_and_path_names_that_collide_as_variables(tmp_path: Path) -> None:
    """static-files and static_files would both be CORRAL_PATH_STATIC_FILES."""
    app = write_app(
        tmp_path,
        MINIMAL + '[paths]\nstatic-files = { path = "a" }\nstatic_files = { path = "b" }\n',
    )
    problem = only_problem(app)
    assert problem.startswith(located(app, 5, "paths.static_files"))
    assert "$CORRAL_PATH_STATIC_FILES" in problem


def test_crlf_and_bom_keep_line_numbers(tmp_path: Path) -> None:
    """A file saved by a Windows editor (BOM, CRLF) loads, and lines are still right."""
    (tmp_path / "corral.toml").write_bytes(
        b'\xef\xbb\xbf[app]\r\nname = "shop"\r\n\r\n[ports]\r\n\thttp = "x"\r\n'
    )
    assert only_problem(tmp_path) == located(tmp_path, 5, "ports.http") + (
        'expected an integer 1..65535, got "x"'
    )
