"""Configuration: what is accepted, and the one-line answer to everything that is not."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import scripted_backend
from conftest import free_port, plugin_env, run_cli, scripted_config, write_config
from shiphook import Target
from shiphook.errors import ConfigError
from shiphook.instance import open_instance
from shiphook.services import public_target

BACKEND = '[backends.fake]\nplugin = "scripted"\n'


def load(path):
    return open_instance(path, plugin_modules=[], plugin_objects=[scripted_backend])


def test_the_shipped_default_config_loads_without_any_orchestrator(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from conftest import ROOT

    instance = load(ROOT / "configs" / "shiphook.toml")
    assert instance.config.server.database_url == "sqlite:///shiphook.db"
    instance.close()


def test_a_full_config_resolves_plugin_keys_with_the_plugins_models(tmp_path):
    instance = load(scripted_config(tmp_path))
    web = instance.config.targets["web"]
    assert web.kind == "app" and web.backend == "fake"
    assert web.options.name == "web"
    assert web.options.repository == "registry.test/app"
    assert instance.config.targets["migrate"].parameters == ("EXIT", "GREETING")
    instance.close()


def test_every_target_key_reaches_the_target_its_backend_gets_and_the_api(tmp_path):
    config = write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/shiphook.db"
        [backends.fake]
        plugin = "scripted"
        [targets.nightly]
        kind = "job"
        backend = "fake"
        name = "nightly"
        repository = "registry.test/nightly"
        rollout_timeout = 42
        on_failure = "leave"
        retry_budget = 7.5
        allowed_tags = 'v\\d+'
        parameters = ["DAY"]
        max_concurrent_runs = 3
        call_timeout = 9
        """,
    )
    instance = load(config)
    target = instance.config.targets["nightly"]
    assert isinstance(target, Target[scripted_backend.ScriptedTargetOptions])
    assert target.options == scripted_backend.ScriptedTargetOptions(
        name="nightly", repository="registry.test/nightly"
    )
    assert public_target(target) == {
        "name": "nightly",
        "kind": "job",
        "backend": "fake",
        "rolloutTimeout": 42.0,
        "onFailure": "leave",
        "retryBudget": 7.5,
        "allowedTags": "v\\d+",
        "parameters": ["DAY"],
        "maxConcurrentRuns": 3,
        "callTimeout": 9.0,
        "options": {"name": "nightly", "repository": "registry.test/nightly", "env": {}},
    }
    instance.close()


def test_the_database_url_environment_variable_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIPHOOK_DATABASE_URL", f"sqlite:///{tmp_path}/other.db")
    instance = load(scripted_config(tmp_path))
    assert instance.config.server.database_url.endswith("other.db")
    instance.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[backends.x]\nplugin = "swam"\n', "backends.x.plugin: unknown backend plugin 'swam'"),
        (
            BACKEND + '[targets.web]\nkind = "app"\nbackend = "prod"\nname = "w"\n',
            "targets.web.backend: no backend named 'prod' (configured backends: fake)",
        ),
        (
            BACKEND + '[targets.web]\nkind = "app"\nbackend = "fake"\n',
            "targets.web.name: Field required",
        ),
        (
            BACKEND + '[targets.web]\nkind = "app"\nbackend = "fake"\nname = "w"\nservice = "x"\n',
            "targets.web.service: unknown key",
        ),
        (
            BACKEND + '[targets.web]\nkind = "cron"\nbackend = "fake"\nname = "w"\n',
            "targets.web.kind: Input should be 'app' or 'job'",
        ),
        (
            BACKEND + '[targets.w]\nkind = "app"\nbackend = "fake"\nname = "w"\non_failure = "x"\n',
            "targets.w.on_failure: Input should be 'rollback' or 'leave'",
        ),
        (
            BACKEND
            + '[targets.w]\nkind = "app"\nbackend = "fake"\nname = "w"\nallowed_tags = "("\n',
            "targets.w.allowed_tags: not a valid regular expression",
        ),
        (
            BACKEND
            + '[targets.w]\nkind = "app"\nbackend = "fake"\nname = "w"\nparameters = ["A"]\n',
            "targets.w: parameters applies to job targets only",
        ),
        (
            BACKEND
            + '[targets.w]\nkind = "job"\nbackend = "fake"\nname = "w"\nparameters = ["1X"]\n',
            "targets.w.parameters[0]: String should match pattern",
        ),
        ('[server]\nport = "eighty"\n', "server.port: Input should be a valid integer"),
        ("[server]\nlisten = 1\n", "server.listen: unknown key (expected one of: body_timeout,"),
        (
            "[deployer]\nthread = 3\n",
            "unknown key (expected one of: lease_seconds, scan_interval, ",
        ),
        (
            "[serverr]\n",
            "serverr: unknown key (expected one of: backends, deployer, server, targets)",
        ),
        (
            BACKEND + "polz = 3\n",
            "backends.fake.polz: unknown key (expected one of: address, fail_in,",
        ),
        ("[server\n", "not valid TOML"),
        (
            '[server]\ndatabase_url = "nonsense"\n',
            "server.database_url: not a database URL (expected e.g. sqlite:///shiphook.db",
        ),
        ('[server]\ndatabase_url = "sqlite://"\n', "in-memory SQLite database"),
        *[  # SQLAlchemy warned in two lines and opened the file read-write; a file named
            # "x.db?mode=ro" with uri=true, or "file:x.db"
            (
                f'[server]\ndatabase_url = "sqlite:///{path}"\n',
                f"server.database_url: a SQLite URL takes no arguments here ({key!r} given): ",
            )
            for path, key in [
                ("x.db?mode=ro", "mode"),
                ("x.db?uri=true&mode=ro", "uri"),
                ("file:x.db?uri=true", "uri"),
                ("x.db?isolation_level=IMMEDIATE", "isolation_level"),
            ]
        ],
        (
            "[server]\nmax_header_bytes = 100\n",
            "server.max_header_bytes: Input should be greater than or equal to 1024",
        ),
        ("[server]\nmax_headers = 5000\n", "server.max_headers: Input should be less than"),
        *[
            (
                f"[server]\npublic_url = {url!r}\n",
                "server.public_url: expected the base URL CI jobs reach shiphook at, like https://",
            )
            for url in (
                "ci:s3cret@deploy.example.com",  # not shown: no scheme tells it is a URL
                "ci:s3cret@deploy.example.com/x?y=a://b",
                "deploy.example.com/",
                "https://x.com?a=1",
                "https://x.com#f",
                'https://x.com/a"b',
            )
        ],
        ("[server]\nheader_timeout = 0\n", "server.header_timeout: Input should be greater than"),
        # finite, and within a year: clocks and timers are computed from them
        ("[deployer]\nscan_interval = inf\n", "deployer.scan_interval: Input should be a finite"),
        ("[deployer]\nlease_seconds = 1e15\n", "deployer.lease_seconds: Input should be less"),
        ("[server]\ndatabase_timeout = 3e6\n", "server.database_timeout: Input should be less"),
        ("[server]\nshutdown_timeout = nan\n", "server.shutdown_timeout: Input should be a finite"),
        (
            BACKEND
            + '[targets.w]\nkind = "app"\nbackend = "fake"\nname = "w"\nretry_budget = inf\n',
            "targets.w.retry_budget: Input should be a finite number",
        ),
        *[
            (
                f"[server]\npublic_url = {url!r}\n",
                "server.public_url: expected the base URL CI jobs reach shiphook at",
            )
            for url in ("http://[::1", "http://[zz]:80", "https://deploy.example.com:port")
        ],
        *[
            (
                f"[server]\npublic_url = {url!r}\n",
                "server.public_url: expected no user or password in it (no @): the printed curl",
            )
            for url in (
                "https://ci:s3cret@deploy.example.com",
                "https://s3cret@deploy.example.com",
                "https://ci:s3cret/x@deploy.example.com",
            )
        ],
        # a number written as a string is a mistake in TOML, not a number
        ('[server]\nport = "8080"\n', "server.port: Input should be a valid integer"),
        ('[server]\nmax_wait = "60"\n', "server.max_wait: Input should be a valid number"),
        ("[deployer]\nthreads = 2.0\n", "deployer.threads: Input should be a valid integer"),
        (
            BACKEND
            + '[targets.w]\nkind = "app"\nbackend = "fake"\nname = "w"\nrollout_timeout = "10"\n',
            "targets.w.rollout_timeout: Input should be a valid number",
        ),
        (
            BACKEND
            + '[targets.w]\nkind = "app"\nbackend = "fake"\nname = "w"\nretry_budget = true\n',
            "targets.w.retry_budget: Input should be a valid number",
        ),
        ("[server]\nmax_connections = 0\n", "server.max_connections: Input should be greater"),
        # what the printed curl line and the listening socket would both fail on, later
        *[
            (f"[server]\nhost = {host!r}\n", f"server.host: expected a host name {rest}")
            for host, rest in [
                ("[::1]", "or an IP address; an IPv6 address without brackets"),
                ("deploy.example.com:8080", "or an IP address; an IPv6 address without brackets"),
                ("ci:s3cret@deploy.example.com", "or an IP address; an IPv6 address without"),
                ("a" * 64, "(ASCII letters, digits, dots and dashes; labels of at most 63"),
                ("", "(ASCII letters, digits, dots and dashes; labels of at most 63"),
            ]
        ],
        # a credential is not quoted inside a list either
        (
            BACKEND + 'address = ["ci:s3cret@h"]\n',
            "backends.fake.address: Input should be a valid string",
        ),
        # a value too small to work with: every hook a 503, every request a 408, lease churn,
        # a scan loop that never sleeps
        *[
            (f"[{section}]\n{key} = {value}\n", f"{section}.{key}: Input should be greater than or")
            for section, key, value in [
                ("server", "database_timeout", 1e-9),
                ("server", "header_timeout", 0.1),
                ("server", "body_timeout", 0.5),
                ("deployer", "lease_seconds", 0.5),
                ("deployer", "scan_interval", 0.001),
            ]
        ],
        (
            "[server]\nshutdown_timeout = 5\n",
            "server.shutdown_timeout: 5 s must be more than database_timeout (5 s)",
        ),
        (  # the default shutdown_timeout: the error says how to fix it
            "[server]\ndatabase_timeout = 10\n",
            "server.shutdown_timeout: 10 s must be more than database_timeout (10 s), so that a "
            "stop answers the requests whose deployment is being committed: raise "
            "shutdown_timeout (default 10) or lower database_timeout",
        ),
    ],
)
def test_a_bad_config_names_the_file_the_key_and_what_is_expected(tmp_path, text, expected):
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert expected in caught.value.message
    assert str(path) in caught.value.message or "database_url" in caught.value.message
    assert "s3cret" not in caught.value.message


def test_a_bad_database_url_from_the_environment_is_named_so_and_never_quoted(
    tmp_path, monkeypatch
):
    for url in ("post gres://u:hunter2@db/shiphook", "postgresql://u:hunter2@db:port/shiphook"):
        monkeypatch.setenv("SHIPHOOK_DATABASE_URL", url)
        with pytest.raises(ConfigError) as caught:
            open_instance(write_config(tmp_path, ""))
        assert caught.value.message.startswith("SHIPHOOK_DATABASE_URL: not a database URL")
        assert "hunter2" not in caught.value.message
    for url in (
        "postgresql://u:hun@ter2@127.0.0.1:1/db",
        "postgresql://u:hun@ter/2@127.0.0.1:1/db",
        "postgresql://u:hun@ter?2@127.0.0.1:1/db",
    ):
        monkeypatch.setenv("SHIPHOOK_DATABASE_URL", url)
        with pytest.raises(ConfigError) as caught:
            open_instance(write_config(tmp_path, ""))
        assert caught.value.message == (
            "SHIPHOOK_DATABASE_URL: the URL's user or password holds an @: write it as %40"
        )
    config = write_config(tmp_path, "")
    for url, expected in [
        ("http://u:hunter2@db/shiphook", "SHIPHOOK_DATABASE_URL: no driver for http: "),
        (
            f"postgresql://u:hunter2@127.0.0.1:{free_port()}/db",
            "SHIPHOOK_DATABASE_URL: cannot use postgresql+psycopg://u:***@127.0.0.1:",
        ),
    ]:
        result = run_cli(
            "hooks", "list", config=config, env=plugin_env(SHIPHOOK_DATABASE_URL=url), check=False
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"shiphook: {expected}"), result.stderr
        assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_a_password_in_the_database_urls_query_is_never_shown(tmp_path):
    url = "postgresql://u:one@127.0.0.1:1/db?sslmode=disable&password=two&sslpassword=three"
    result = run_cli(
        "check",
        config=write_config(tmp_path, ""),
        env=plugin_env(SHIPHOOK_DATABASE_URL=url),
        check=False,
    )
    [line] = [line for line in result.stdout.splitlines() if line.startswith("database ")]
    assert line.startswith(
        "database postgresql+psycopg://u:***@127.0.0.1:1/db?"
        "password=***&sslmode=disable&sslpassword=***: UNREACHABLE: "
    ), line
    assert not {"one", "two", "three"} & set(re.split(r"\W+", result.stdout + result.stderr))


@pytest.mark.parametrize("url", ["postgresql://u:s3cret@127.0.0.1:1/x%00", "sqlite:///a%0Ab.db"])
def test_a_database_url_with_a_control_character_is_refused_without_showing_it(tmp_path, url):
    """libpq ends the URL at a NUL: postgresql://u:...@127.0.0.1:1/x%00 was tried as another
    user on the default port."""
    result = run_cli(
        "check",
        config=write_config(tmp_path, ""),
        env=plugin_env(SHIPHOOK_DATABASE_URL=url),
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        "shiphook: SHIPHOOK_DATABASE_URL: the URL holds a control character (%00 or the like): "
        "a database URL has none\n"
    )


@pytest.mark.parametrize("token", ["short", " " * 16, "abcdefghijklmnop\n", "é" * 17])
def test_an_admin_token_no_client_could_send_is_refused_at_start(tmp_path, monkeypatch, token):
    monkeypatch.setenv("SHIPHOOK_ADMIN_TOKEN", token)
    with pytest.raises(ConfigError) as caught:
        open_instance(write_config(tmp_path, ""))
    assert caught.value.message == (
        "SHIPHOOK_ADMIN_TOKEN: expected at least 16 printable ASCII characters and no spaces or "
        "line breaks, which a client could not send (make one with `openssl rand -hex 32`)"
    )


@pytest.mark.parametrize(
    ("variables", "says"),
    [
        (
            {"SHIPHOOK_ADMIN_TOKEN_SHA256": "ABCD" * 16},
            "SHIPHOOK_ADMIN_TOKEN_SHA256: expected the admin token's SHA-256 as 64 lowercase hex "
            'digits (`printf %s "$TOKEN" | sha256sum`)',
        ),
        (
            {"SHIPHOOK_ADMIN_TOKEN_SHA256": "ab" * 32, "SHIPHOOK_ADMIN_TOKEN": "a" * 32},
            "set SHIPHOOK_ADMIN_TOKEN or SHIPHOOK_ADMIN_TOKEN_SHA256, not both",
        ),
    ],
)
def test_an_admin_token_digest_is_checked_at_start(tmp_path, monkeypatch, variables, says):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        open_instance(write_config(tmp_path, ""))
    assert caught.value.message == says


def test_every_mistake_in_plugin_keys_is_reported_at_once(tmp_path):
    """Each backend and target is checked, also a target whose backend's own keys are wrong:
    one run names every mistake, each on a line of its own, not the first alone."""
    text = (
        '[backends.x]\nplugin = "swam"\n'
        + BACKEND
        + 'colour = "red"\n'
        + '[targets.a]\nkind = "app"\nbackend = "prod"\nname = "w"\n'
        + '[targets.b]\nkind = "app"\nbackend = "fake"\n'
        + '[targets.c]\nkind = "app"\nbackend = "x"\nname = "w"\n'
    )
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path)
    lines = caught.value.message.splitlines()
    expected = [
        "backends.x.plugin: unknown backend plugin 'swam'",
        "backends.fake.colour: unknown key",
        "targets.a.backend: no backend named 'prod' (configured backends: fake, x)",
        "targets.b.name: Field required",
    ]
    assert len(lines) == len(expected), lines
    for line, part in zip(lines, expected, strict=True):
        assert line.startswith(f"{path}: {part}"), lines


def test_a_missing_config_file_says_how_to_choose_one(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found .*--config or SHIPHOOK_CONFIG"):
        load(tmp_path / "absent.toml")


@pytest.mark.parametrize("command", [["check"], ["serve"]])
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[backends.x]\nplugin = "swam"\n', "backends.x.plugin: unknown backend plugin 'swam'"),
        (
            BACKEND + '[targets.web]\nkind = "app"\nbackend = "prod"\nname = "w"\n',
            "targets.web.backend: no backend named 'prod'",
        ),
        (
            BACKEND + '[targets.web]\nkind = "app"\nbackend = "fake"\n',
            "targets.web.name: Field required",
        ),
    ],
    ids=["unknown-plugin", "unknown-backend", "missing-locator"],
)
def test_serve_and_check_exit_non_zero_with_one_line_and_no_traceback(
    tmp_path, command, text, expected
):
    path = write_config(tmp_path, text)
    result = run_cli(*command, config=path, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert lines[0].startswith(f"shiphook: {path}: ")
    assert "Traceback" not in result.stderr + result.stdout


def test_serve_on_an_address_it_cannot_have_says_so_in_one_line_before_starting(tmp_path):
    """Nothing starts, and nothing claims to be serving, when the address cannot be bound."""
    path = scripted_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (["--port", str(port)], f"cannot listen on 127.0.0.1:{port} ", "in use"),
            (["--host", "999.1.1.1"], "cannot listen on 999.1.1.1:", "not known"),
        ]
        for args, where, cause in cases:
            result = run_cli("serve", *args, config=path, check=False)
            assert result.returncode == 2, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, result.stderr
            assert lines[0].startswith(f"shiphook: {where}") and cause in lines[0], lines
    wrong = run_cli("serve", "--port", "99999", config=path, check=False)
    assert wrong.returncode == 2
    assert "--port" in wrong.stderr and "1<=x<=65535" in wrong.stderr, wrong.stderr


def test_check_reports_reachable_backends_and_found_targets(tmp_path):
    result = run_cli("check", config=scripted_config(tmp_path), check=False)
    assert "backend fake (scripted): scripted backend ready" in result.stdout
    assert "target web (app): found, running registry.test/app:initial" in result.stdout
    # the `gone` target points at a service that does not exist
    assert "target gone (app): NOT USABLE: service missing-service not found" in result.stdout
    assert result.returncode == 1


def test_check_fails_when_a_backend_is_unreachable(tmp_path):
    path = scripted_config(tmp_path, backend_extra='unreachable = "connection refused"')
    result = run_cli("check", config=path, check=False)
    assert result.returncode == 1
    assert "backend fake (scripted): UNREACHABLE: connection refused" in result.stdout


def test_check_passes_when_everything_answers(tmp_path):
    path = write_config(
        tmp_path,
        BACKEND + '[targets.web]\nkind = "app"\nbackend = "fake"\nname = "web"\n',
    )
    result = run_cli("check", config=path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_old_engine_section_still_works_and_says_it_is_now_deployer(tmp_path, caplog):
    config = write_config(tmp_path, "[engine]\nlease_seconds = 7\n")
    instance = load(config)
    assert instance.config.deployer.lease_seconds == 7
    instance.close()
    assert f"{config}: [engine] is now called [deployer]; rename the section" in caplog.text


def test_the_old_and_the_new_name_of_the_deployer_section_together_are_refused(tmp_path):
    config = write_config(tmp_path, "[engine]\nlease_seconds = 7\n[deployer]\nlease_seconds = 8\n")
    with pytest.raises(ConfigError, match=r"keep only \[deployer\]"):
        load(config)


def test_a_config_file_that_never_ends_is_refused():
    with pytest.raises(ConfigError) as caught:
        load(Path("/dev/zero"))
    assert caught.value.message == "/dev/zero: larger than 1048576 bytes: not a config file"
