"""The configuration file: `[server]`, `[deployer]`, `[backends.<name>]` and `[targets.<name>]`.

Parsed with tomllib, validated with pydantic; each backend's own keys are validated by that
backend's `Options` / `TargetOptions` models. Every problem becomes a `ConfigError` naming the
file, the key path and what is expected.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from shiphook.backends import Backend, BackendRegistry, Seconds, Target, TargetSettings
from shiphook.db import DATABASE_TIMEOUT, DATABASE_URL_ENV, SQLITE_SYNCHRONOUS
from shiphook.errors import ConfigError, describe_validation_error

log = logging.getLogger("shiphook.config")

DEFAULT_CONFIG_PATH = Path("configs/shiphook.toml")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"

SHUTDOWN_TIMEOUT = 10.0  # seconds; `[server] shutdown_timeout`
NAME_RULE = "1 to 63 characters of A-Z a-z 0-9 _ . -, the first a letter or digit"


def _name(value: str) -> str:
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(f"not a valid name: expected {NAME_RULE}")
    return value


Name = Annotated[str, AfterValidator(_name)]


HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?")


def listen_host(host: str) -> str:
    """An address to listen on: a host name, an IPv4 address, or an IPv6 address (without
    the brackets a URL puts around it); `ValueError` saying so for anything else."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                "expected a host name or an IP address; an IPv6 address without brackets, and "
                "no port (that goes in port)"
            ) from None
    elif not HOST_NAME.fullmatch(host):
        raise ValueError(
            "expected a host name (ASCII letters, digits, dots and dashes; labels of at most 63 "
            "characters) or an IP address"
        )
    return host


def host_port(host: str, port: int) -> str:
    """`host:port` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: Annotated[str, AfterValidator(listen_host)] = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535, strict=True)
    database_url: str = "sqlite:///shiphook.db"
    public_url: str | None = Field(None, description="base URL CI jobs use, for printed curl lines")
    disabled_plugins: list[str] = []
    max_wait: Seconds = 900
    workers: int = Field(1, ge=1, le=64, strict=True)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # at most an hour: PostgreSQL's statement_timeout, which takes it, ends at 24.8 days
    database_timeout: Annotated[Seconds, Field(ge=1, le=3600)] = DATABASE_TIMEOUT
    sqlite_synchronous: Literal["full", "normal"] = SQLITE_SYNCHRONOUS
    max_header_bytes: int = Field(65536, ge=1024, le=1048576, strict=True)
    max_headers: int = Field(100, ge=10, le=1000, strict=True)
    header_timeout: Annotated[Seconds, Field(ge=1)] = 10
    body_timeout: Annotated[Seconds, Field(ge=1)] = 10
    max_connections: int = Field(4096, ge=1, le=1048576, strict=True)
    shutdown_timeout: Seconds = Field(SHUTDOWN_TIMEOUT, validate_default=True)

    @field_validator("public_url")
    @classmethod
    def _an_http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        expected = (
            "expected the base URL CI jobs reach shiphook at, like https://deploy.example.com"
        )
        # no query, fragment or quote: the printed curl line appends the path and quotes it
        if not re.fullmatch(r"(?i:https?)://[^/\s?#'\"]+(/[^\s?#'\"]*)?", url):
            raise ValueError(expected)
        if "@" in url:  # anywhere: a password may hold a "/" that ends the host to a parser
            raise ValueError(
                "expected no user or password in it (no @): the printed curl line, which goes "
                "into CI files, would show them; CI jobs authenticate with the hook's token"
            )
        try:
            urllib.parse.urlsplit(url).port  # noqa: B018 - parsed for its errors
        except ValueError:  # "http://[::1", a port that is no number
            raise ValueError(f"{expected} (its host or port does not parse)") from None
        return url

    @field_validator("shutdown_timeout")
    @classmethod
    def _outlasts_a_commit(cls, seconds: float, info: ValidationInfo) -> float:
        database = info.data.get("database_timeout")  # validated before it, when valid
        if database is not None and seconds <= database:
            raise ValueError(
                f"{seconds:g} s must be more than database_timeout ({database:g} s), so that "
                "a stop answers the requests whose deployment is being committed: raise "
                f"shutdown_timeout (default {SHUTDOWN_TIMEOUT:g}) or lower database_timeout"
            )
        return seconds


class DeployerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threads: int = Field(16, ge=1, le=1024, strict=True)
    lease_seconds: Annotated[Seconds, Field(ge=1)] = 30
    scan_interval: Annotated[Seconds, Field(ge=0.05)] = 1.0


class BackendSection(BaseModel):
    model_config = ConfigDict(extra="allow")

    plugin: str


class TargetSection(TargetSettings):
    """`[targets.<name>]`: shiphook's keys, and the backend's, which `resolve_config` checks."""

    model_config = ConfigDict(extra="allow")


class ConfigFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    server: ServerSettings = ServerSettings()
    deployer: DeployerSettings = DeployerSettings()
    backends: dict[Name, BackendSection] = {}
    targets: dict[Name, TargetSection] = {}


@dataclass(frozen=True)
class BackendConfig:
    name: str
    plugin: str
    options: BaseModel


@dataclass(frozen=True)
class Config:
    path: Path
    server: ServerSettings
    deployer: DeployerSettings
    backends: dict[str, BackendConfig]
    targets: dict[str, Target]


def config_path(given: str | os.PathLike[str] | None = None) -> Path:
    """The file to read: the given path, else `SHIPHOOK_CONFIG`, else the default."""
    return Path(given or os.environ.get("SHIPHOOK_CONFIG") or DEFAULT_CONFIG_PATH)


MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: Path) -> ConfigFile:
    """Parse and validate the core keys; plugin keys are checked by `resolve_config`."""
    try:
        with path.open("rb") as file:  # read to a limit: /dev/zero never ends
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes: not a config file")
        raw = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: config file not found (choose one with --config or SHIPHOOK_CONFIG)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if "engine" in raw:  # the section's name before the deployment engine became the deployer
        if "deployer" in raw:
            raise ConfigError(
                f"{path}: [engine] and [deployer] are the same section ([engine] is its old "
                "name); keep only [deployer]"
            )
        log.warning("%s: [engine] is now called [deployer]; rename the section", path)
        raw["deployer"] = raw.pop("engine")
    try:
        parsed = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(path, exc, model=ConfigFile) from None
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        parsed.server.database_url = url
    return parsed


def resolve_config(path: Path, parsed: ConfigFile, registry: BackendRegistry) -> Config:
    """Validate each backend's and target's plugin keys with the plugin's own models; every
    mistake is reported at once, each on a line of its own."""
    known = ", ".join(sorted(registry.classes)) or "none installed"
    errors: list[str] = []
    backends: dict[str, BackendConfig] = {}
    for name, section in parsed.backends.items():
        backend_class = registry.classes.get(section.plugin)
        if backend_class is None:
            errors.append(
                f"{path}: backends.{name}.plugin: unknown backend plugin {section.plugin!r} "
                f"(available: {known}; see `shiphook plugins`)"
            )
            continue
        try:
            options = _plugin_model(path, f"backends.{name}", backend_class.Options, section)
        except ConfigError as exc:
            errors.append(exc.message)
            continue
        backends[name] = BackendConfig(name=name, plugin=section.plugin, options=options)

    targets: dict[str, Target] = {}
    for name, section in parsed.targets.items():
        if section.backend not in parsed.backends:
            configured = ", ".join(sorted(parsed.backends)) or "none configured"
            errors.append(
                f"{path}: targets.{name}.backend: no backend named {section.backend!r} "
                f"(configured backends: {configured})"
            )
            continue
        backend_class = registry.classes.get(parsed.backends[section.backend].plugin)
        if backend_class is None:  # its plugin is not installed: said above
            continue
        try:
            target = _target(path, name, section, backend_class)
        except ConfigError as exc:
            errors.append(exc.message)
            continue
        targets[name] = target
    if errors:
        raise ConfigError("\n".join(errors))
    return Config(
        path=path,
        server=parsed.server,
        deployer=parsed.deployer,
        backends=backends,
        targets=targets,
    )


def _target(path: Path, name: str, section: TargetSection, backend_class: type[Backend]) -> Target:
    """A target of a backend of `backend_class`, its plugin keys validated by the plugin."""
    plugin = backend_class.name
    if section.kind not in backend_class.kinds:
        raise ConfigError(
            f"{path}: targets.{name}.kind: the {plugin} backend does not run {section.kind} "
            f"targets (it supports: {', '.join(sorted(backend_class.kinds))})"
        )
    if (
        section.kind == "app"
        and section.on_failure == "rollback"
        and not backend_class.can_rollback
    ):
        raise ConfigError(
            f"{path}: targets.{name}.on_failure: the {plugin} backend cannot roll back a "
            'failed rollout; set on_failure = "leave" (the default is "rollback")'
        )
    if section.max_concurrent_runs > 1 and not backend_class.concurrent_runs:
        raise ConfigError(
            f"{path}: targets.{name}.max_concurrent_runs: the {plugin} backend runs one run "
            "of a job at a time; remove the key or set it to 1"
        )
    options = _plugin_model(path, f"targets.{name}", backend_class.TargetOptions, section)
    settings = {key: getattr(section, key) for key in TargetSettings.model_fields}
    return Target[backend_class.TargetOptions](name=name, options=options, **settings)


def _plugin_model(path: Path, prefix: str, model: type[BaseModel], section: BaseModel) -> Any:
    try:
        return model.model_validate(section.model_extra or {})
    except ValidationError as exc:  # the table's keys are the plugin's and the section's
        raise _config_error(path, exc, prefix, model, type(section).model_fields) from None


def _config_error(
    path: Path, exc: ValidationError, prefix: str = "", model: Any = None, also: Any = ()
) -> ConfigError:
    lines = describe_validation_error(exc, prefix, model, also)
    return ConfigError("\n".join(f"{path}: {line}" for line in lines))
