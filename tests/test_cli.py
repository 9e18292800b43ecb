"""The CLI, through click's runner on the same process (fast) and its real entry point."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import (
    POSTGRES_URL,
    SCRIPTED_CONFIG,
    free_port,
    plugin_env,
    run_cli,
    scripted_config,
    write_config,
)
from shiphook.cli import in_clear, main
from shiphook.db import create_db_engine, safe_url
from shiphook.testing import silent_orchestrator
from sqlalchemy.engine import make_url


@pytest.fixture
def cli(tmp_path, monkeypatch):
    for key, value in plugin_env().items():
        monkeypatch.setenv(key, value)
    config = scripted_config(tmp_path)
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(main, ["--config", str(config), *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result

    return run


def test_hooks_create_prints_the_token_once_and_a_ready_curl_line(cli):
    out = cli("hooks", "create", "web", "--name", "github-actions").output
    token = next(w for w in out.split() if w.startswith("shk_"))
    assert "shown once" in out
    # the token is in the line only as the CI secret's variable (not in a shell's history),
    # and reaches curl on its standard input (not in its arguments, which `ps` shows)
    assert "printf 'X-Deploy-Hook-Token: %s\\n' \"$SHIPHOOK_TOKEN\" | curl " in out
    assert " -H @- " in out
    assert out.count(token) == 1
    assert "http://127.0.0.1:8080/api/v1/dh" in out
    assert """--data '{"imageTag":"1.2.0"}'""" in out
    listed = cli("hooks", "list").output
    assert "github-actions" in listed and token not in listed


def test_hooks_create_json_carries_the_token_and_curl(cli):
    data = json.loads(cli("hooks", "create", "migrate", "--name", "gl", "--json").stdout)
    assert data["token"].startswith("shk_")
    assert data["target"] == "migrate"
    assert "instanceEnvironmentVariables" in data["curl"]


def test_the_curl_line_brackets_an_ipv6_host(tmp_path, monkeypatch):
    config = scripted_config(tmp_path, server='host = "::1"')
    result = run_cli("hooks", "create", "web", "--name", "a", "--json", config=config)
    assert "'http://[::1]:8080/api/v1/dh'" in json.loads(result.stdout)["curl"]


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("http://localhost.:8080", False),
        ("http://0x7f.1:8080", False),
        ("http://ci.localhost:8080", True),  # curl before 7.85 asks DNS
        ("http://127.0.0.1 evil.example:8080", True),
        ("http://127.1:8080", False),
        ("http://2130706433:8080", False),
        ("http://[::ffff:127.0.0.1]:8080", False),
        ("http://127.0.0.2", False),
        ("http://localhost.example.com", True),
        ("http://127.0.0.1.example.com", True),
        ("http://[::ffff:10.0.0.1]:8080", True),
        ("http://10.1", True),
        ("HTTPS://deploy.example.com", False),
    ],
)
def test_loopback_is_recognised_in_the_forms_curl_reads(url, warned):
    assert in_clear(url) == warned


@pytest.mark.parametrize(
    ("server", "warned"),
    [
        ('host = "0.0.0.0"', True),
        ('public_url = "http://deploy.example.com"', True),
        ('public_url = "https://deploy.example.com"', False),
        ('host = "::1"', False),
        ('public_url = "http://localhost:8080"', False),
        ("", False),  # 127.0.0.1
    ],
)
def test_hooks_create_warns_when_the_token_would_cross_a_network_in_clear(tmp_path, server, warned):
    config = scripted_config(tmp_path, server=server)
    result = run_cli("hooks", "create", "web", "--name", "a", config=config)
    assert ("plain HTTP to another machine" in result.stderr) == warned, result.stderr
    if warned:
        assert "[server] public_url" in result.stderr
        assert "shk_" not in result.stderr
    as_json = run_cli("hooks", "create", "web", "--name", "b", "--json", config=config)
    assert json.loads(as_json.stdout)["token"].startswith("shk_")  # stdout stays JSON
    assert ("plain HTTP to another machine" in as_json.stderr) == warned, as_json.stderr


def test_hooks_list_filters_by_target_and_never_shows_tokens(cli):
    cli("hooks", "create", "web", "--name", "a")
    cli("hooks", "create", "api", "--name", "b")
    data = json.loads(cli("hooks", "list", "api", "--json").stdout)
    assert [h["name"] for h in data] == ["b"]
    assert all("token" not in h and "tokenDigest" not in h for h in data)
    assert len(json.loads(cli("hooks", "list", "--json").stdout)) == 2


def test_hooks_list_shows_the_hooks_of_a_target_no_longer_configured(cli, tmp_path):
    cli("hooks", "create", "api", "--name", "b")
    config = tmp_path / "shiphook.toml"
    config.write_text(config.read_text().replace("[targets.api]", "[targets.api2]"))
    data = json.loads(cli("hooks", "list", "api", "--json").stdout)
    assert [(h["name"], h["target"]) for h in data] == [("b", "api")]  # to find and delete them
    refused = cli("hooks", "list", "apii", code=2).output
    assert refused.startswith("shiphook: no target named 'apii' (configured: "), refused


def test_hooks_delete_removes_the_hook(cli):
    hook = json.loads(cli("hooks", "create", "web", "--name", "a", "--json").stdout)
    assert "Deleted hook" in cli("hooks", "delete", str(hook["id"])).output
    assert json.loads(cli("hooks", "list", "--json").stdout) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["hooks", "create", "nope", "--name", "x"], "no target named 'nope'"),
        (["hooks", "delete", "999"], "no hook with id 999"),
        (["hooks", "list", "nope"], "no target named 'nope'"),
        (["deployments", "show", "nope"], "no deployment with id 'nope'"),
        (
            ["deployments", "list", "--status", "bogus"],
            "status: 'bogus' is not a deployment status",
        ),
        (["deployments", "list", "--target", "nope"], "no target named 'nope' (configured: "),
    ],
)
def test_bad_cli_calls_say_what_is_wrong_and_exit_2(cli, args, message):
    result = cli(*args, code=2)
    assert message in result.output


CONFIGURED = "configured: api, gone, migrate, report, strict, web"


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["hooks", "create", "nosuchtarget", "--name", "x"],
            f"no target named 'nosuchtarget' ({CONFIGURED})",
        ),
        (["hooks", "create", "web", "--name", " "], "name: expected 1 to 100 printable characters"),
        (["hooks", "list", "nosuchtarget"], f"no target named 'nosuchtarget' ({CONFIGURED})"),
        (["hooks", "delete", "0"], "no hook with id 0"),
        (
            ["deployments", "list", "--status", "bogus"],
            "status: 'bogus' is not a deployment status",
        ),
        (["deployments", "list", "--target", "a b"], "target: expected a target's name"),
        (["deployments", "show", "nope"], "no deployment with id 'nope'"),
        (["deployments", "rollback", "nope"], "no deployment with id 'nope'"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else "",
)
def test_a_command_that_fails_on_its_arguments_creates_no_database(tmp_path, args, line):
    result = run_cli(*args, config=scripted_config(tmp_path), check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"shiphook: {line}") and result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shiphook.toml"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["hooks", "create", b"w\xff", "--name", "x"], r"no target named 'w\xff' ("),
        (["hooks", "delete", b"\xff"], r"Invalid value for 'HOOK_ID': '\xff' is not a whole"),
        (["deployments", "show", r"\udcff"], r"no deployment with id '\\udcff'"),  # as typed
    ],
    ids=["a target", "a hook id", "text that reads like a surrogate"],
)
def test_command_line_bytes_that_are_not_utf8_are_shown_as_given(tmp_path, args, line):
    """From a shell in another encoding, or a file name: `\\xff`, not the lone surrogate that
    Python holds such a byte as (`\\udcff`)."""
    result = run_cli(*map(os.fsdecode, args), config=scripted_config(tmp_path), check=False)
    assert result.stderr.startswith(f"shiphook: {line}"), result.stderr
    missing = tmp_path / os.fsdecode(b"x\xff.toml")
    result = run_cli("check", config=missing, check=False)
    assert result.stderr.startswith(f"shiphook: {tmp_path}/x\\xff.toml: config file not found")


def test_check_creates_no_database(tmp_path):
    result = run_cli("check", config=scripted_config(tmp_path), check=False)
    assert result.returncode == 1  # the target "gone" is not found
    assert "database sqlite:///" in result.stdout and ": no database yet" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shiphook.toml"]


def test_usage_errors_name_the_missing_argument(cli):
    result = cli("hooks", "create", "web", code=2)
    assert "--name" in result.output
    result = cli("hooks", "delete", "abc", code=2)
    assert "'abc' is not a whole number (ASCII digits, 60 at most)" in result.output


def test_targets_and_plugins_list_as_tables_and_json(cli):
    assert "web" in cli("targets").output.splitlines()[1]
    targets = json.loads(cli("targets", "--json").stdout)
    assert {t["name"] for t in targets} >= {"web", "migrate"}
    plugins = json.loads(cli("plugins", "--json").stdout)
    scripted = next(p for p in plugins if p["name"] == "scripted_backend")
    assert scripted["backends"] == ["scripted"]
    assert "scripted_backend" in cli("plugins").output
    # what each built-in backend can do, as its capability flags say
    capabilities = {b: c for p in plugins for b, c in p["capabilities"].items()}
    assert capabilities["swarm"] == ["app", "job", "rollback", "run-env-as-given"]
    assert capabilities["kubernetes"] == [
        *("app", "job", "rollback", "concurrent-runs", "run-env-as-given")
    ]
    assert capabilities["nomad"] == ["app", "job", "rollback", "concurrent-runs"]


def test_deployments_list_and_show(cli, tmp_path):
    from conftest import scripted_backend
    from shiphook.instance import open_instance

    token = json.loads(cli("hooks", "create", "web", "--name", "a", "--json").stdout)["token"]
    instance = open_instance(
        scripted_config(tmp_path), plugin_modules=[], plugin_objects=[scripted_backend]
    )
    hook = instance.hooks.authenticate(token)
    deployment, _ = asyncio.run(instance.deployments.accept(hook, b'{"imageTag": "7.0"}'))
    instance.close()

    listed = json.loads(cli("deployments", "list", "--json").stdout)
    assert [d["id"] for d in listed] == [deployment["id"]]
    assert deployment["id"] in cli("deployments", "list", "--target", "web").output
    shown = cli("deployments", "show", deployment["id"]).output
    assert "status:" in shown and "queued" in shown and "imageTag=7.0" in shown
    data = json.loads(cli("deployments", "show", deployment["id"], "--json").stdout)
    assert data["history"][0]["status"] == "queued"


def test_a_new_sqlite_database_is_created_private_not_narrowed_later(tmp_path, monkeypatch):
    """Created 0600 before SQLite opens it: a file made as the umask allows and narrowed after
    could be opened by another user in between, and read through that descriptor for ever."""
    import shiphook.db

    def no_narrowing(*_args):
        raise AssertionError("chmod")

    monkeypatch.setattr(shiphook.db.os, "chmod", no_narrowing)
    umask = os.umask(0)
    try:
        engine = create_db_engine(f"sqlite:///{tmp_path}/new.db")
        with engine.connect() as connection:
            connection.exec_driver_sql("CREATE TABLE t (x)")
        engine.dispose()
    finally:
        os.umask(umask)
    assert oct((tmp_path / "new.db").stat().st_mode & 0o777) == "0o600"


def test_deployments_list_and_show_print_what_a_caller_sent_as_one_escaped_line(cli, tmp_path):
    """A job's environment comes from whoever holds a hook token: a line break in it would
    forge a line of the listing, an escape or bidi sequence drive the operator's terminal."""
    from conftest import scripted_backend
    from shiphook.instance import open_instance

    token = json.loads(cli("hooks", "create", "migrate", "--name", "a", "--json").stdout)["token"]
    instance = open_instance(
        scripted_config(tmp_path), plugin_modules=[], plugin_objects=[scripted_backend]
    )
    forged = "1\n2026-12-01 00:00:00 FORGED\x1b[31m\x1b]0;title\x07\u202eevil"
    env = [{"name": "GREETING", "value": forged}, {"name": "EXIT", "value": "a b"}]
    body = json.dumps({"instanceEnvironmentVariables": env})
    deployment, _ = asyncio.run(
        instance.deployments.accept(instance.hooks.authenticate(token), body.encode())
    )
    instance.close()
    for args in (("list",), ("show", deployment["id"])):
        out = cli("deployments", *args).output
        escaped = '"1\\n2026-12-01 00:00:00 FORGED\\u001b[31m\\u001b]0;title\\u0007\\u202eevil"'
        assert f'GREETING={escaped} EXIT="a b"' in out
        assert not {"\x1b", "\x07", "\u202e"} & set(out), out
        if args == ("list",):
            assert len(out.splitlines()) == 2, out  # the header, one row


def test_db_upgrade_is_repeatable(cli):
    assert "latest schema" in cli("db", "upgrade").output
    assert "latest schema" in cli("db", "upgrade").output


# -- a database that cannot be used ------------------------------------------------------------


def unusable_database(kind: str, tmp_path: Path) -> tuple[str, str]:
    """A database URL shiphook cannot use, and the cause its one-line error must name."""
    postgres = make_url(POSTGRES_URL).set(password="db-secret")
    if kind == "postgresql-closed-port":
        url, cause = postgres.set(host="127.0.0.1", port=free_port()), "Connection refused"
        return url.render_as_string(hide_password=False), cause
    if kind == "postgresql-missing-database":
        url, cause = postgres.set(database="no_such_db"), 'database "no_such_db" does not exist'
        return url.render_as_string(hide_password=False), cause
    if kind == "sqlite-missing-directory":
        return f"sqlite:///{tmp_path}/missing/shiphook.db", "No such file or directory"
    if kind == "sqlite-directory-is-a-file":
        (tmp_path / "file").write_text("")
        return f"sqlite:///{tmp_path}/file/shiphook.db", "Not a directory"
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    (tmp_path / "ro").mkdir(mode=0o555)
    return f"sqlite:///{tmp_path}/ro/shiphook.db", "Permission denied"


UNUSABLE_DATABASES = [
    "postgresql-closed-port",
    "postgresql-missing-database",
    "sqlite-missing-directory",
    "sqlite-directory-is-a-file",
    "sqlite-read-only-directory",
]


@pytest.mark.parametrize("kind", UNUSABLE_DATABASES)
def test_an_unusable_database_is_one_line_naming_it_and_the_cause(tmp_path, kind):
    url, cause = unusable_database(kind, tmp_path)
    env = plugin_env(SHIPHOOK_DATABASE_URL=url)
    config = scripted_config(tmp_path)
    shown = safe_url(create_db_engine(url))
    for command in (["db", "upgrade"], ["hooks", "list"], ["deployments", "list"], ["serve"]):
        result = run_cli(*command, config=config, env=env, check=False)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stdout == ""
        [line] = result.stderr.splitlines()
        assert line.startswith(f"shiphook: SHIPHOOK_DATABASE_URL: cannot use {shown}: "), line
        assert cause in line
        assert "db-secret" not in line


@pytest.mark.parametrize("kind", UNUSABLE_DATABASES)
def test_check_reports_an_unusable_database_and_exits_1(tmp_path, kind):
    url, _ = unusable_database(kind, tmp_path)
    env = plugin_env(SHIPHOOK_DATABASE_URL=url)
    result = run_cli("check", config=scripted_config(tmp_path), env=env, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""
    [line] = [line for line in result.stdout.splitlines() if line.startswith("database ")]
    assert ": UNREACHABLE: " in line
    assert "db-secret" not in result.stdout
    assert "backend fake (scripted): scripted backend ready" in result.stdout


def test_a_database_failing_after_it_opened_is_one_line_too(cli, tmp_path):
    cli("db", "upgrade")
    with sqlite3.connect(tmp_path / "shiphook.db") as database:  # a schema damaged by hand
        database.execute("DROP TABLE hook")
    result = cli("hooks", "list", code=2)
    assert (
        result.output
        == f"shiphook: server.database_url: cannot use sqlite:///{tmp_path}/shiphook.db: "
        "no such table: hook\n"
    )


def test_check_reports_the_schema_version(tmp_path):
    config = scripted_config(tmp_path)  # its target "gone" makes `check` exit 1
    database = f"database sqlite:///{tmp_path}/shiphook.db"
    before = run_cli("check", config=config, check=False).stdout
    assert f"{database}: no database yet" in before
    run_cli("db", "upgrade", config=config)
    after = run_cli("check", config=config, check=False).stdout
    assert f"{database}: schema 0003, the latest" in after


def test_the_sqlite_database_is_readable_by_its_owner_only(tmp_path):
    """It holds the hooks' token digests and the job runs' environments: whatever the umask,
    its files are 0600, and an older database's are narrowed at the next start."""
    config = scripted_config(tmp_path)
    umask = os.umask(0o022)
    try:
        run_cli("hooks", "create", "web", "--name", "ci", config=config)
        database = tmp_path / "shiphook.db"
        assert oct(database.stat().st_mode & 0o777) == "0o600"
        database.chmod(0o644)  # as a shiphook before this one made it
        run_cli("hooks", "list", "web", config=config)
        assert oct(database.stat().st_mode & 0o777) == "0o600"
        with contextlib.closing(sqlite3.connect(database)) as open_meanwhile:
            open_meanwhile.execute("UPDATE hook SET name = 'ci'")  # as a server would write
            open_meanwhile.commit()
            sidecars = list(tmp_path.glob("shiphook.db-*"))
            assert {f.name for f in sidecars} == {"shiphook.db-wal", "shiphook.db-shm"}
            assert {oct(f.stat().st_mode & 0o777) for f in sidecars} == {"0o600"}
    finally:
        os.umask(umask)


def test_check_reports_a_plugin_call_that_hangs_or_returns_what_it_may_not(tmp_path):
    """Waited for no longer than the deployer would (the target's call_timeout), and checked
    as the deployer checks: a plugin bug is a line of the report, not a hang or a traceback."""
    with silent_orchestrator() as address:
        hanging = f'address = "{address}"\ntimeout = 60'
        config = scripted_config(tmp_path, backend_extra=hanging, server="")
        config.write_text(
            config.read_text().replace('name = "web"', 'name = "web"\ncall_timeout = 1')
        )
        checked = run_cli("check", config=config, check=False)
    assert checked.returncode == 1, checked.stderr
    assert (
        "backend fake (scripted): UNREACHABLE: the scripted backend's check did not return "
        "within 1s" in checked.stdout
    ), checked.stdout

    config = scripted_config(tmp_path, backend_extra='garbage_from = "describe"')
    checked = run_cli("check", config=config, check=False)
    assert checked.returncode == 1, checked.stderr
    assert (
        "target web (app): NOT USABLE: the scripted backend's describe returned "
        "'registry.test/app:1', not a TargetState, its image one line of printable text: a bug "
        "in the plugin"
    ) in checked.stdout, checked.stdout

    # what the orchestrator says is one line, whatever it holds
    refused = 'unreachable = "refused\\n2026-12-01 00:00:00 FORGED\\u001b[2J"'
    checked = run_cli("check", config=scripted_config(tmp_path, backend_extra=refused), check=False)
    assert (
        "backend fake (scripted): UNREACHABLE: refused; 2026-12-01 00:00:00 FORGED\\x1b[2J\n"
        in checked.stdout
    ), checked.stdout


def test_a_command_that_creates_the_database_says_where(tmp_path):
    """A relative sqlite:/// path is the working directory's: `hooks create` run elsewhere
    than `serve` would make a database of its own, and a token the server does not know."""
    config = write_config(
        tmp_path,
        SCRIPTED_CONFIG.format(backend_extra="", timeout=5).replace(
            "[backends.fake]", '[server]\ndatabase_url = "sqlite:///relative.db"\n\n[backends.fake]'
        ),
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = run_cli("hooks", "create", "web", "--name", "ci", config=config, cwd=elsewhere)
    assert first.stderr == (
        f"shiphook: created a new database, {elsewhere / 'relative.db'}: if `shiphook serve` uses "
        "another (a relative sqlite:/// path is the working directory's), run this where it runs "
        "or give database_url an absolute path\n"
    )
    again = run_cli("hooks", "list", config=config, cwd=elsewhere)
    assert again.stderr == ""
    assert "ci" in again.stdout


def test_version_is_the_installed_distributions(tmp_path):
    result = run_cli("--version", config=scripted_config(tmp_path))
    assert result.stdout == f"shiphook {importlib.metadata.version('shiphook')}\n"


@pytest.mark.parametrize(
    "args", [["deployments", "list", "--target", "nope"], ["hooks", "list", "nope"]]
)
def test_listing_what_no_target_has_creates_no_database(cli, tmp_path, args):
    result = cli(*args, code=2)
    assert result.output.startswith("shiphook: no target named 'nope' (configured: "), result.output
    assert not (tmp_path / "shiphook.db").exists()


@pytest.mark.parametrize("args", [[], ["hooks"]])
def test_shiphook_without_a_command_shows_its_help(args):
    result = CliRunner().invoke(main, args)
    assert result.output.startswith("Usage: "), result.output
    assert "(see '" not in result.output
