"""The `shiphook` command: serve, check, and manage targets, hooks and deployments."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import re
import socket
import sys
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from shiphook.backends import (
    Backend,
    BackendError,
    PluginCall,
    capabilities,
    checked_return,
)
from shiphook.config import config_path, host_port, listen_host, read_config_file
from shiphook.db import SchemaUnknown, describe_failure, safe_url, schema_state, unusable
from shiphook.errors import ShiphookError, one_line, quoted
from shiphook.instance import Instance, hide_admin_token, open_instance
from shiphook.plugin_manager import (
    collect_backends,
    describe_plugins,
    make_plugin_manager,
    plugin_error,
)
from shiphook.services import (
    LIST_LIMITS,
    WHOLE_NUMBER,
    check_deployment_filters,
    check_deployment_id,
    check_hook_id,
    configured_target,
    hook_name,
    public_target,
)
from shiphook.tokens import TOKEN_HEADER


class ShiphookGroup(click.Group):
    """Turns shiphook's own errors, and click's about the command line, into one line on stderr
    and exit status 2, no traceback."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        with _usage_in_one_line(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            try:
                with _usage_in_one_line(ctx):
                    return super().invoke(ctx)
            except SQLAlchemyError as exc:  # the database failed after it was opened
                raise unusable(ctx.obj["instance"].storage.engine, exc) from None
        except ShiphookError as exc:
            click.echo(f"shiphook: {_bytes_shown(exc.message)}", err=True)
            ctx.exit(2)


# a byte of the command line that is not UTF-8 reaches Python as a lone surrogate (PEP 383): as
# it is, or as `repr` shows it in a quoted value (after an even number of backslashes)
_NOT_UTF8 = re.compile(r"[\udc80-\udcff]|(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")


def _bytes_shown(message: str) -> str:
    """`message` with each byte of the command line that is not UTF-8 shown as it was given,
    `\\xff`, rather than as Python holds it, `\\udcff`."""

    def byte(found: re.Match[str]) -> str:
        if found[2] is None:
            return f"\\x{ord(found[0]) - 0xDC00:02x}"
        return f"{found[1]}\\x{found[2]}"

    return _NOT_UTF8.sub(byte, message)


@contextlib.contextmanager
def _usage_in_one_line(ctx: click.Context) -> Iterator[None]:
    """click's usage errors, which it shows in four lines, in one; with the same exit status."""
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:  # the help itself, not a mistake
        raise
    except click.UsageError as exc:
        command = (exc.ctx or ctx).command_path
        message = exc.format_message().rstrip(".")
        click.echo(f"shiphook: {_bytes_shown(message)} (see '{command} --help')", err=True)
        ctx.exit(exc.exit_code)


class WholeNumber(click.IntRange):
    """click's `IntRange` of ASCII digits only: Python's `int()` also reads other scripts'
    digits (Arabic-Indic seven as 7), which an id or a count never is."""

    name = "integer"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not WHOLE_NUMBER.fullmatch(value):
            self.fail(
                f"{quoted(value)} is not a whole number (ASCII digits, 60 at most)", param, ctx
            )
        return super().convert(value, param, ctx)


def listen_host_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    try:
        return None if value is None else listen_host(value)
    except ValueError as exc:
        raise click.BadParameter(f"{quoted(value)}: {exc}", ctx, param) from None


@click.group(cls=ShiphookGroup)
@click.version_option(package_name="shiphook", message="%(prog)s %(version)s")
@click.option(
    "--config",
    "config",
    envvar="SHIPHOOK_CONFIG",
    type=click.Path(dir_okay=False),
    help="Config file (default: configs/shiphook.toml; env SHIPHOOK_CONFIG).",
)
@click.pass_context
def main(ctx: click.Context, config: str | None) -> None:
    """shiphook: deploy hooks for Kubernetes, Docker Swarm and Nomad."""
    ctx.obj = {"config": config}


def instance_of(ctx: click.Context) -> Instance:
    """The config, its plugins and backends. A command opens the database with `migrated` once
    its arguments are known to be valid, so that a command that fails creates no database."""
    instance = open_instance(ctx.obj["config"])
    ctx.obj["instance"] = instance
    ctx.call_on_close(instance.close)
    return instance


def migrated(instance: Instance) -> Instance:
    """The instance, its database open and at the latest schema."""
    created = instance.migrate()
    if created is not None:
        click.echo(
            f"shiphook: created a new database, {created}: if `shiphook serve` uses another "
            "(a relative sqlite:/// path is the working directory's), run this where it runs "
            "or give database_url an absolute path",
            err=True,
        )
    return instance


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def emit(data: Any, as_json: bool, human: Callable[[], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        human()


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    cells = [[("" if v is None else one_line(str(v))) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


# -- server ------------------------------------------------------------------------


@main.command()
@click.option(
    "--host", callback=listen_host_option, help="Listen address (default: [server] host)."
)
@click.option("--port", type=WholeNumber(1, 65535), help="Listen port (default: [server] port).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Apply migrations, start the deployer and serve the API."""
    from shiphook.server import serve as run_server

    hide_admin_token()
    instance = instance_of(ctx)
    logging.basicConfig(
        level=instance.config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    run_server(instance, host=host, port=port)


@main.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate the config, open the database, reach every backend and find every target."""
    instance = instance_of(ctx)
    click.echo(f"config {instance.config.path}: valid")
    failed = False
    database = instance.storage.engine
    try:
        click.echo(f"database {safe_url(database)}: {schema_state(database)}")
    except SchemaUnknown as exc:
        click.echo(f"database {safe_url(database)}: NOT USABLE: {exc}")
        failed = True
    except (SQLAlchemyError, OSError) as exc:
        click.echo(f"database {safe_url(database)}: UNREACHABLE: {describe_failure(database, exc)}")
        failed = True
    failing: dict[str, str] = {}  # the backends whose check failed, and how
    for name, backend in instance.backends.items():
        bound = min(  # as long as any of its targets would wait for a call
            (t.call_timeout for t in instance.config.targets.values() if t.backend == name),
            default=CHECK_TIMEOUT,
        )
        try:
            said = one_line(_bounded(bound, backend, "check"))
            click.echo(f"backend {name} ({backend.name}): {said}")
        except BackendError as exc:  # transient: not reached; else reached, and it refused
            label, failing[name] = (
                ("UNREACHABLE", "is unreachable")
                if exc.transient
                else ("NOT USABLE", "is not usable")
            )
            click.echo(f"backend {name} ({backend.name}): {label}: {exc.message}")
            failed = True
        except (Exception, SystemExit) as exc:  # a plugin bug: named, not a traceback or an exit
            failing[name] = "failed"
            click.echo(f"backend {name} ({backend.name}): FAILED: {plugin_error(exc)}")
            failed = True
    for name, target in instance.config.targets.items():
        if target.backend in failing:
            why = failing[target.backend]
            click.echo(f"target {name}: not checked, backend {target.backend} {why}")
            continue
        try:
            backend = instance.backends[target.backend]
            state = _bounded(target.call_timeout, backend, "describe", target)
            detail = f" ({state.detail})" if state.detail else ""
            running = one_line(f"{state.image or 'unknown'}{detail}")
            click.echo(f"target {name} ({target.kind}): found, running {running}")
        except BackendError as exc:
            click.echo(f"target {name} ({target.kind}): NOT USABLE: {exc.message}")
            failed = True
        except (Exception, SystemExit) as exc:
            click.echo(f"target {name} ({target.kind}): FAILED: {plugin_error(exc)}")
            failed = True
    if failed:
        ctx.exit(1)


CHECK_TIMEOUT = 30.0  # seconds `check` waits for a backend that no target uses


def _bounded(seconds: float, backend: Backend, method: str, *args: Any) -> Any:
    """`backend.<method>(*args)` on a thread of its own, waited for at most `seconds` (the
    target's `call_timeout`, as the deployer waits) and checked against the contract: a plugin
    that hangs or returns what it may not is reported, not waited for or crashed on."""
    call = PluginCall(f"check-{method}", getattr(backend, method), *args)
    if not call.done.wait(seconds):
        raise BackendError(
            f"the {backend.name} backend's {method} did not return within {seconds:g}s",
            transient=True,
        )
    return checked_return(backend, method, call.result())


@main.command()
@json_option
@click.pass_context
def targets(ctx: click.Context, as_json: bool) -> None:
    """List the configured targets."""
    instance = instance_of(ctx)
    data = [public_target(t) for t in instance.config.targets.values()]
    emit(
        data,
        as_json,
        lambda: table(
            ["NAME", "KIND", "BACKEND", "ON FAILURE", "TIMEOUT", "LOCATOR"],
            [
                (
                    t["name"],
                    t["kind"],
                    t["backend"],
                    t["onFailure"] if t["kind"] == "app" else "-",  # a job run is not undone
                    f"{t['rolloutTimeout']:g}s",
                    " ".join(f"{k}={v}" for k, v in t["options"].items() if v is not None),
                )
                for t in data
            ],
        ),
    )


@main.command()
@json_option
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """List loaded plugins and the backends they provide (only the config's [server] table
    needs to be valid: this is where a target naming an unknown plugin is sorted out)."""
    file = config_path(ctx.obj["config"])
    parsed = read_config_file(file)
    pm = make_plugin_manager(disabled=parsed.server.disabled_plugins, config=file)
    registry = collect_backends(pm)
    data = [
        {
            "name": i.name,
            "distribution": i.distribution,
            "version": i.version,
            "backends": list(i.backends),
            "descriptions": {b: registry.classes[b].description for b in i.backends},
            "capabilities": {b: capabilities(registry.classes[b]) for b in i.backends},
        }
        for i in describe_plugins(pm, registry)
    ]
    emit(
        data,
        as_json,
        lambda: table(
            ["PLUGIN", "DISTRIBUTION", "VERSION", "BACKEND", "CAPABILITIES", "DESCRIPTION"],
            [
                (
                    d["name"],
                    d["distribution"],
                    d["version"],
                    b,
                    " ".join(d["capabilities"][b]),
                    d["descriptions"][b],
                )
                for d in data
                for b in d["backends"]
            ],
        ),
    )


# -- hooks ----------------------------------------------------------------------------


@main.group()
def hooks() -> None:
    """Create, list and delete deploy hooks."""


TOKEN_VARIABLE = "SHIPHOOK_TOKEN"  # the CI secret the printed curl line reads the token from


@hooks.command("create")
@click.argument("target")
@click.option("--name", required=True, help="Who uses the hook, e.g. github-actions.")
@json_option
@click.pass_context
def hooks_create(ctx: click.Context, target: str, name: str, as_json: bool) -> None:
    """Create a hook for TARGET and print its token (shown this once only)."""
    instance = instance_of(ctx)
    kind = configured_target(instance.config.targets, target).kind
    hook_name(name)
    created = migrated(instance).hooks.create(target=target, name=name)
    data = created.to_json()
    server = instance.config.server
    url = (server.public_url or f"http://{host_port(server.host, server.port)}").rstrip("/")
    body = '{"imageTag":"1.2.0"}' if kind == "app" else '{"instanceEnvironmentVariables":[]}'
    # the token from the CI secret, and into curl through its standard input (printf is the
    # shell's own): in the line it would stay in the shell's history, and in curl's arguments
    # it would show in `ps` to every user of the machine
    curl = (
        f"printf '{TOKEN_HEADER}: %s\\n' \"${TOKEN_VARIABLE}\" | "
        f"curl --fail-with-body -sS -X POST '{url}/api/v1/dh' -H @- --data '{body}'"
    )

    def human() -> None:
        click.echo(f"Created hook {created.id} ({created.name}) for target {created.target}.")
        click.echo(f"Token (shown once, store it as a CI secret): {created.token}")
        click.echo(f"Call it from CI with the token in ${TOKEN_VARIABLE}:")
        click.echo(f"  {curl}")

    emit({**data, "curl": curl}, as_json, human)
    if in_clear(url):
        click.echo(
            f"warning: {url} is plain HTTP to another machine: the token would cross the "
            "network readable by anyone on the way; put a proxy that terminates TLS in "
            "front of shiphook and set [server] public_url to its https:// address",
            err=True,
        )


NUMERIC_IPV4 = re.compile(r"(?i)(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}")


def in_clear(url: str) -> bool:
    """Whether a CI job calling `url` sends its token unencrypted over a network: plain HTTP
    to a host that is not this machine's loopback."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() != "http":
        return False
    host = (parsed.hostname or "").rstrip(".")  # a name may end with the root's dot
    if host == "localhost":  # not *.localhost: curl before 7.85 asks DNS for those
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not NUMERIC_IPV4.fullmatch(host):
            return True  # any other name is taken as another machine's (not resolved here)
        try:  # 127.1, 2130706433 or 0x7f.1, as curl reads them too
            address = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return True
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_loopback


@hooks.command("list")
@click.argument("target", required=False)
@json_option
@click.pass_context
def hooks_list(ctx: click.Context, target: str | None, as_json: bool) -> None:
    """List hooks, of one TARGET or all (tokens are never shown)."""
    instance = instance_of(ctx)
    if target is not None and instance.new_database_file() is not None:
        configured_target(instance.config.targets, target)  # no database: no hook was made
    found = migrated(instance).hooks.list(target=target)
    data = [h.to_json() for h in found]
    emit(
        data,
        as_json,
        lambda: table(
            ["ID", "NAME", "TARGET", "CREATED", "LAST USED"],
            [
                (h["id"], h["name"], h["target"], h["createdAt"], h["lastUsedAt"] or "never")
                for h in data
            ],
        ),
    )


@hooks.command("delete")
@click.argument("hook_id", type=WholeNumber())
@json_option
@click.pass_context
def hooks_delete(ctx: click.Context, hook_id: int, as_json: bool) -> None:
    """Delete a hook; its token stops working at once."""
    instance = instance_of(ctx)
    check_hook_id(hook_id)
    deleted = migrated(instance).hooks.delete(hook_id)
    emit(
        deleted.to_json(),
        as_json,
        lambda: click.echo(
            f"Deleted hook {deleted.id} ({deleted.name}) of target {deleted.target}."
        ),
    )


# -- deployments -------------------------------------------------------------------------


@main.group()
def deployments() -> None:
    """Look at deployments."""


@deployments.command("list")
@click.option("--target", help="Only this target.")
@click.option("--status", help="Only this status (queued, in_progress, succeeded, ...).")
@click.option(
    "--limit",
    type=WholeNumber(LIST_LIMITS.start, LIST_LIMITS.stop - 1),
    default=50,
    show_default=True,
)
@json_option
@click.pass_context
def deployments_list(
    ctx: click.Context, target: str | None, status: str | None, limit: int, as_json: bool
) -> None:
    """List recent deployments, newest first."""
    instance = instance_of(ctx)
    check_deployment_filters(target=target, status=status, limit=limit)
    if target is not None and instance.new_database_file() is not None:
        configured_target(instance.config.targets, target)  # no database: nothing was recorded
    found = migrated(instance).deployments.list(target=target, status=status, limit=limit)
    data = [d.to_json() for d in found]
    emit(
        data,
        as_json,
        lambda: table(
            ["ID", "TARGET", "REQUESTED", "IMAGE", "STATUS", "CREATED", "HOOK", "MESSAGE"],
            [
                (
                    d["id"],
                    d["target"],
                    requested(d),
                    image_of(d),
                    d["status"],
                    d["createdAt"],
                    d["hookName"],
                    _short(d["message"]),
                )
                for d in data
            ],
        ),
    )


@deployments.command("show")
@click.argument("deployment_id")
@json_option
@click.pass_context
def deployments_show(ctx: click.Context, deployment_id: str, as_json: bool) -> None:
    """Show one deployment with its history."""
    instance = instance_of(ctx)
    check_deployment_id(deployment_id)
    data = migrated(instance).deployments.get(deployment_id).to_json()

    def human() -> None:
        for key in (
            "id",
            "target",
            "kind",
            "status",
            "message",
            "hookName",
            "createdAt",
            "startedAt",
            "finishedAt",
            "previousImage",
            "rollbackOf",
            "supersededBy",
        ):
            if data.get(key) not in (None, ""):
                click.echo(f"{key + ':':15} {one_line(str(data[key]))}")
        click.echo(f"{'requested:':15} {one_line(requested(data))}")
        if image_of(data):
            click.echo(f"{'image:':15} {one_line(str(image_of(data)))}")
        if data["backendRef"]:
            click.echo(f"{'backendRef:':15} {json.dumps(data['backendRef'])}")
        click.echo("history:")
        for event in data["history"]:
            message = f"  {one_line(event['message'])}" if event["message"] else ""
            click.echo(f"  {event['at']}  {event['status']}{message}")

    emit(data, as_json, human)


@deployments.command("rollback")
@click.argument("deployment_id")
@json_option
@click.pass_context
def deployments_rollback(ctx: click.Context, deployment_id: str, as_json: bool) -> None:
    """Deploy again the tag of the last deployment shiphook completed successfully before
    DEPLOYMENT_ID (or, with none, of the image DEPLOYMENT_ID replaced), as a new deployment."""
    instance = instance_of(ctx)
    check_deployment_id(deployment_id)
    created = migrated(instance).deployments.rollback(deployment_id)
    emit(
        created.to_json(),
        as_json,
        lambda: click.echo(
            f"Queued deployment {created.id}: {created.target} back to {created.image_tag} "
            f"(rollback of {deployment_id}); a running server picks it up within seconds."
        ),
    )


def requested(deployment: dict[str, Any]) -> str:
    parts = []
    if deployment["imageTag"]:
        parts.append(f"imageTag={deployment['imageTag']}")
    parts += [
        f"{v['name']}={shown_value(v['value'])}"
        for v in deployment["instanceEnvironmentVariables"] or ()
    ]
    return " ".join(parts) or "-"


def shown_value(value: str) -> str:
    """An environment value as a listing shows it: bare when it is plain, else quoted as JSON
    (`"a b"`, `"1\\n2"`), so that a space or a line break in it reads as part of it."""
    plain = value != "" and value.isprintable() and not set(value) & set(' "\\')
    return value if plain else json.dumps(value, ensure_ascii=False)


def image_of(deployment: dict[str, Any]) -> str | None:
    """The image the deployment rolled out or the job run ran, as its backend reference says."""
    return (deployment["backendRef"] or {}).get("image")


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- database ----------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply pending schema migrations."""
    instance = migrated(instance_of(ctx))
    click.echo(f"database at the latest schema ({safe_url(instance.storage.engine)})")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
