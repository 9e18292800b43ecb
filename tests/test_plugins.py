"""The plugin system: entry points, blocking by name, fresh managers, the documented API."""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import socket
import ssl
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import scripted_backend
import urllib3
from conftest import plugin_env, run_cli, write_config
from dockerd import make_tls_files
from mypy import api as mypy_api
from shiphook import Backend, Target, connection_failure, hookimpl, hookspecs
from shiphook.errors import ConfigError
from shiphook.plugin_manager import collect_backends, make_plugin_manager

ROOT = Path(__file__).parent.parent


def install_fake_distribution(site: Path) -> None:
    """A third-party package as pip would leave it: a module plus dist-info with an entry point."""
    (site / "shiphook_echo.py").write_text(
        textwrap.dedent(
            """
            from shiphook import Backend, Progress, TargetState, hookimpl

            class Echo(Backend):
                name = "echo"
                description = "answers every call at once"
                def check(self): return "echo ready"
                def describe(self, target): return TargetState(image=None, detail="an echo")
                def deploy(self, target, *, image_tag, deployment_id): return {"tag": image_tag}
                def run_job(self, target, *, env, image_tag, deployment_id): return {}
                def progress(self, target, ref): return Progress("succeeded", "echoed")

            @hookimpl
            def register_backends(register):
                register(Echo)
            """
        )
    )
    dist = site / "shiphook_echo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shiphook-echo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[shiphook]\necho = shiphook_echo\n")


def test_a_third_party_backend_loads_through_the_entry_point_group(tmp_path):
    install_fake_distribution(tmp_path)
    config = write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/db.sqlite"
        [backends.e]
        plugin = "echo"
        [targets.t]
        kind = "app"
        backend = "e"
        """,
    )
    env = plugin_env(PYTHONPATH=str(tmp_path), SHIPHOOK_PLUGINS="")
    plugins = json.loads(run_cli("plugins", "--json", config=config, env=env).stdout)
    echo = next(p for p in plugins if p["name"] == "echo")
    assert echo == {
        "name": "echo",
        "distribution": "shiphook-echo",
        "version": "1.0",
        "backends": ["echo"],
        "descriptions": {"echo": "answers every call at once"},
        "capabilities": {"echo": ["app", "job", "rollback", "concurrent-runs", "run-env-as-given"]},
    }
    table = run_cli("plugins", config=config, env=env).stdout.splitlines()
    headers = ["PLUGIN", "DISTRIBUTION", "VERSION", "BACKEND", "CAPABILITIES", "DESCRIPTION"]
    assert table[0].split() == headers
    assert (
        "echo shiphook-echo 1.0 echo app job rollback concurrent-runs run-env-as-given "
        "answers every call at once"
    ) in [" ".join(r.split()) for r in table]
    checked = run_cli("check", config=config, env=env).stdout
    assert "backend e (echo): echo ready" in checked
    assert "target t (app): found, running unknown (an echo)" in checked


def test_a_backend_written_for_the_bare_target_gets_typed_targets_and_works(harness):
    """Plugins written before `Target` was generic annotate `target: Target`, as the scripted
    backend does: they are handed the same `Target[TheirTargetOptions]`, and run unchanged."""
    for method in ("describe", "deploy", "run_job", "progress", "rollback"):
        annotation = inspect.get_annotations(getattr(scripted_backend.ScriptedBackend, method))
        assert annotation["target"] == "Target", method
    web = harness.instance.config.targets["web"]
    assert isinstance(web, Target[scripted_backend.ScriptedTargetOptions])
    deployment_id = harness.deploy(harness.new_hook("web"), {"imageTag": "1.1"})
    assert harness.wait_for(deployment_id)["status"] == "succeeded"
    assert harness.backend.image("web") == "registry.test/app:1.1"


TYPED_BACKEND = """
from pydantic import BaseModel
from shiphook import Backend, Progress, Ref, Target, TargetState


class ServiceOptions(BaseModel):
    service: str


ServiceTarget = Target[ServiceOptions]


class ServiceBackend(Backend):
    name = "service"
    TargetOptions = ServiceOptions

    def check(self) -> str:
        return "ready"

    def describe(self, target: ServiceTarget) -> TargetState:
        reveal_type(target.options.service)
        return TargetState(image=target.options.servce)

    def deploy(self, target: ServiceTarget, *, image_tag: str, deployment_id: str) -> Ref:
        return {}

    def progress(self, target: Target, ref: Ref) -> Progress:
        return Progress("succeeded")
"""


def test_a_type_checker_knows_a_backends_target_options(tmp_path):
    """`Target[ServiceOptions]` types `target.options`, so a typo in a key is caught before it
    runs; the methods so annotated, or with a bare `Target`, fit the `Backend` they override."""
    (tmp_path / "typed_backend.py").write_text(TYPED_BACKEND)
    report, errors, _ = mypy_api.run(
        [str(tmp_path / "typed_backend.py"), "--cache-dir", str(tmp_path / ".mypy_cache")]
    )
    assert errors == ""
    revealed, typo = [line.split(": ", 1)[1] for line in report.splitlines() if ".py:" in line]
    assert re.fullmatch(r'note: Revealed type is "(builtins\.)?str"', revealed)
    assert (
        typo
        == 'error: "ServiceOptions" has no attribute "servce"; maybe "service"?  [attr-defined]'
    )


def test_disabled_plugins_blocks_an_entry_point_plugin_by_name(tmp_path):
    install_fake_distribution(tmp_path)
    config = write_config(
        tmp_path,
        """
        [server]
        disabled_plugins = ["echo"]
        [backends.e]
        plugin = "echo"
        """,
    )
    env = plugin_env(PYTHONPATH=str(tmp_path), SHIPHOOK_PLUGINS="")
    result = run_cli("check", config=config, env=env, check=False)
    assert result.returncode == 2
    assert "backends.e.plugin: unknown backend plugin 'echo'" in result.stderr


def test_disabled_plugins_blocks_a_module_plugin_too(tmp_path):
    config = write_config(
        tmp_path,
        '[server]\ndisabled_plugins = ["scripted_backend"]\n[backends.f]\nplugin = "scripted"\n',
    )
    result = run_cli("check", config=config, check=False)
    assert "unknown backend plugin 'scripted'" in result.stderr


def test_disabling_a_plugin_that_is_not_there_is_an_error_naming_those_that_are(tmp_path):
    """A misspelt name would otherwise leave the plugin it meant loaded, without a word."""
    config = write_config(tmp_path, '[server]\ndisabled_plugins = ["swarn"]\n')
    for command in ("check", "plugins"):
        result = run_cli(command, config=config, check=False)
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"shiphook: {config}: server.disabled_plugins: no plugin named 'swarn' is installed "
            "or in SHIPHOOK_PLUGINS (there are: docker, kubernetes, nomad, scripted_backend, swarm)"
        )


BROKEN_BACKEND = """
from shiphook import Backend, Progress, TargetState, hookimpl

class Broken(Backend):
    name = "broken"
    def __init__(self, options):
        {init}
    def check(self):
        {check}
        return "ready"
    def describe(self, target):
        {describe}
        return TargetState(image=None)
    def deploy(self, target, *, image_tag, deployment_id): return {{}}
    def run_job(self, target, *, env, image_tag, deployment_id): return {{}}
    def progress(self, target, ref): return Progress("succeeded", "")

@hookimpl
def register_backends(register):
    {register}
    register(Broken)
"""


def broken_backend(**code: str) -> str:
    """The module of a backend plugin with `code` in some of its methods."""
    methods = {"init": "pass", "register": "pass", "check": "pass", "describe": "pass"}
    return BROKEN_BACKEND.format(**(methods | code))


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            "raise RuntimeError('no config for me')",
            "SHIPHOOK_PLUGINS: plugin module 'broken_plugin' failed to load: "
            "RuntimeError: no config for me",
        ),
        (
            "def register_backends(:",
            "SHIPHOOK_PLUGINS: plugin module 'broken_plugin' failed to load: SyntaxError: ",
        ),
        (
            "import sys; sys.exit(0)",
            "SHIPHOOK_PLUGINS: plugin module 'broken_plugin' failed to load: it called sys.exit(0)",
        ),
        (
            broken_backend(register="raise RuntimeError('no registry')"),
            "plugin broken_plugin: register_backends failed: RuntimeError: no registry",
        ),
        (
            broken_backend(register="import sys; sys.exit(3)"),
            "plugin broken_plugin: register_backends failed: it called sys.exit(3)",
        ),
        (
            broken_backend(init="raise KeyError('region')"),
            "backends.b: the broken backend (plugin broken_plugin) failed to start: "
            "KeyError: 'region'",
        ),
        (
            broken_backend(init="import sys; sys.exit('bye')"),
            "backends.b: the broken backend (plugin broken_plugin) failed to start: "
            "it called sys.exit('bye')",
        ),
    ],
    ids=[
        "import-raises",
        "syntax-error",
        "import-exits",
        "register-raises",
        "register-exits",
        "init-raises",
        "init-exits",
    ],
)
def test_a_failing_plugin_is_one_line_naming_it_and_exit_2(tmp_path, module, message):
    (tmp_path / "broken_plugin.py").write_text(module)
    config = write_config(tmp_path, '[backends.b]\nplugin = "broken"\n')
    env = plugin_env(PYTHONPATH=str(tmp_path), SHIPHOOK_PLUGINS="broken_plugin")
    result = run_cli("check", config=config, env=env, check=False)
    assert result.returncode == 2, result.stdout
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert message in line


@pytest.mark.parametrize(
    ("module", "line"),
    [
        (
            broken_backend(check="import sys; sys.exit(0)"),
            "backend b (broken): FAILED: it called sys.exit(0)",
        ),
        (
            broken_backend(describe="raise RuntimeError('lost')"),
            "target t (app): FAILED: RuntimeError: lost",
        ),
    ],
    ids=["check-exits", "describe-raises"],
)
def test_check_names_a_backend_that_fails_and_exits_1(tmp_path, module, line):
    (tmp_path / "broken_plugin.py").write_text(module)
    config = write_config(
        tmp_path,
        f"""
        [server]
        database_url = "sqlite:///{tmp_path}/db.sqlite"
        [backends.b]
        plugin = "broken"
        [targets.t]
        kind = "app"
        backend = "b"
        """,
    )
    env = plugin_env(PYTHONPATH=str(tmp_path), SHIPHOOK_PLUGINS="broken_plugin")
    result = run_cli("check", config=config, env=env, check=False)
    assert result.returncode == 1, result.stderr
    assert line in result.stdout.splitlines()
    assert result.stderr == ""


def test_an_entry_point_plugin_calling_sys_exit_is_named_not_obeyed(tmp_path):
    install_fake_distribution(tmp_path)
    (tmp_path / "shiphook_echo.py").write_text("import sys\nsys.exit(0)\n")
    config = write_config(tmp_path, '[backends.e]\nplugin = "echo"\n')
    env = plugin_env(PYTHONPATH=str(tmp_path), SHIPHOOK_PLUGINS="")
    result = run_cli("check", config=config, env=env, check=False)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "plugin echo (shiphook_echo) failed to load: it called sys.exit(0)" in line


def test_each_instance_gets_a_fresh_plugin_manager():
    first = make_plugin_manager(modules=[])
    second = make_plugin_manager(modules=[])
    first.register(scripted_backend)
    assert "scripted" in collect_backends(first).classes
    assert "scripted" not in collect_backends(second).classes


def test_plugin_hook_register_backends_one_name_from_two_plugins_is_an_error_naming_both():
    class SameName(scripted_backend.ScriptedBackend):
        pass

    class Twin:
        @hookimpl
        def register_backends(self, register):
            register(SameName)

    pm = make_plugin_manager(modules=[])
    pm.register(scripted_backend, name="scripted_backend")
    pm.register(Twin(), name="twin")
    with pytest.raises(ConfigError, match="two plugins register a backend named 'scripted'"):
        collect_backends(pm)


def test_plugin_hook_register_backends_refuses_what_is_not_a_backend():
    class Wrong:
        @hookimpl
        def register_backends(self, register):
            register(object)

    pm = make_plugin_manager(modules=[])
    pm.register(Wrong(), name="wrong")
    expected = r"plugin wrong: .* is not a subclass of shiphook\.Backend"
    with pytest.raises(ConfigError, match=expected):
        collect_backends(pm)


def test_an_unimportable_plugin_module_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot import plugin module 'no_such_module'"):
        make_plugin_manager(modules=["no_such_module"])


def test_a_backend_must_implement_every_abstract_method():
    class Half(Backend):
        name = "half"

        def check(self):
            return "ok"

    with pytest.raises(TypeError, match="abstract"):
        Half(None)


# -- the plugin API is documented and tested ------------------------------------------------


def plugin_hooks():
    return [
        f
        for _, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(f, "shiphook_spec")
    ]


def test_the_plugin_hooks_are_found():
    """Else the checks below would pass with nothing to check."""
    assert plugin_hooks()


@pytest.mark.parametrize("plugin_hook", plugin_hooks(), ids=lambda f: f.__name__)
def test_every_plugin_hook_is_documented_in_hookspecs_and_the_readme(plugin_hook):
    assert inspect.getdoc(plugin_hook)
    assert plugin_hook.__name__ in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("plugin_hook", plugin_hooks(), ids=lambda f: f.__name__)
def test_plugin_hooks_have_tests(plugin_hook):
    """Every plugin hook has a test in this module named `test_plugin_hook_<its name>...`, as
    datasette's tests/test_plugins.py asks of its own."""
    prefix = f"test_plugin_hook_{plugin_hook.__name__}"
    assert any(name.startswith(prefix) for name in globals()), f"no {prefix}... test"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (
            "from shiphook import hookimpl\n\n@hookimpl\ndef register_backend(register): ...\n",
            "plugin typo_plugin: unknown hook 'register_backend'; shiphook's one hook is "
            "register_backends",
        ),
        (
            "def register_backends(register):\n    raise AssertionError('never called')\n",
            "plugin unmarked_plugin registers no backend: its register_backends(register) must be "
            "marked @shiphook.hookimpl",
        ),
    ],
    ids=["misspelt hook", "no hookimpl mark"],
)
def test_a_plugin_that_registers_nothing_is_named_with_what_it_lacks(
    tmp_path, monkeypatch, source, expected
):
    module = expected.split()[1].rstrip(":")  # a module of its own: imported modules stay
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        collect_backends(make_plugin_manager(modules=[module]))
    assert caught.value.message.startswith(expected), caught.value.message


def test_shiphook_plugins_lists_what_is_installed_while_a_target_names_an_unknown_plugin(tmp_path):
    """`check` says "unknown backend plugin ... (see `shiphook plugins`)": that must answer."""
    config = write_config(
        tmp_path,
        f'[server]\ndatabase_url = "sqlite:///{tmp_path}/s.db"\n'
        '[backends.b]\nplugin = "scriptd"\n'
        '[targets.web]\nkind = "app"\nbackend = "b"\nname = "web"\n',
    )
    checked = run_cli("check", config=config, check=False)
    assert "unknown backend plugin 'scriptd'" in checked.stderr + checked.stdout
    listed = run_cli("plugins", config=config)
    assert "scripted_backend" in listed.stdout and "scripted" in listed.stdout


@pytest.fixture
def loopback(tmp_path) -> Iterator[list[tuple[str, str]]]:
    """Addresses that fail each way: refused, silent, closing at once, TLS of an unknown CA."""
    listeners = []

    def listener(answer: Callable[[socket.socket], None] | None = None) -> int:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        listeners.append(server)
        if answer is not None:
            threading.Thread(target=lambda: answer(server), daemon=True).start()
        return server.getsockname()[1]

    def close_each(server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = server.accept()
                connection.recv(65536)
                connection.close()

    tls = make_tls_files(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.server_cert, tls.server_key)

    def handshake_each(server: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = server.accept()
                with contextlib.suppress(OSError), context.wrap_socket(connection, True):
                    pass

    refused = socket.socket()  # bound, never listening: the port refuses
    refused.bind(("127.0.0.1", 0))
    listeners.append(refused)
    yield [
        ("Connection refused", f"http://127.0.0.1:{refused.getsockname()[1]}/"),
        ("no answer within 0.5 s", f"http://127.0.0.1:{listener()}/"),
        ("no answer within 0.5 s", f"https://127.0.0.1:{listener()}/"),  # no TLS handshake
        (
            "Remote end closed connection without response",
            f"http://127.0.0.1:{listener(close_each)}/",
        ),
        (
            "certificate verify failed: unable to get local issuer certificate",
            f"https://127.0.0.1:{listener(handshake_each)}/",
        ),
    ]
    for server in listeners:
        server.close()


@pytest.mark.parametrize("client", ["requests", "urllib3"])
def test_connection_failure_names_the_cause_under_the_http_client_s_wrappers(loopback, client):
    """What the plugins put after "cannot reach ...": no pool, retry count or repr of an
    object (`HTTPConnectionPool(host=...): Max retries exceeded ... (Caused by ...)`)."""
    pool = urllib3.PoolManager(retries=False)
    for says, url in loopback:
        with pytest.raises(Exception) as caught:
            if client == "requests":
                requests.get(url, timeout=0.5)
            else:
                pool.request("GET", url, timeout=0.5)
        assert connection_failure(caught.value) == says, (url, caught.value)
    if client == "requests":  # a proxy refusing is not the server refusing
        refused = loopback[0][1]
        with pytest.raises(requests.exceptions.ProxyError) as caught:
            requests.get("http://example.invalid/", proxies={"http": refused}, timeout=0.5)
        assert connection_failure(caught.value) == "the proxy: Connection refused"
