"""Domain errors. Services raise these; the HTTP layer maps each to a status code in one place."""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from collections.abc import Iterable
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

from shiphook.tokens import PREFIX, PREFIXED


class ShiphookError(Exception):
    """Base of every error a person is meant to read."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ShiphookError):
    """The configuration (file, environment or plugins) is unusable; the message says where."""


class InvalidRequest(ShiphookError):
    """A request is malformed; the message names the field and what is expected."""


class Unauthenticated(ShiphookError):
    """A credential is missing where one is required."""


class AdminDisabled(ShiphookError):
    """Admin endpoints are off because no admin token is configured."""


class NotFound(ShiphookError):
    """The thing asked for does not exist, or the credential does not open it."""


class PayloadTooLarge(ShiphookError):
    """The request body exceeds the limit."""


class RequestTimeout(ShiphookError):
    """The request did not all arrive."""


class Conflict(ShiphookError):
    """The request cannot be done in the state things are in."""


class Unprocessable(ShiphookError):
    """Well formed, but contradicts what was sent before (an idempotency key reused, ...)."""


class DatabaseUnavailable(ShiphookError):
    """The database failed or did not answer in time; `cause` is the error's class name (its
    message may name hosts and users, so it goes to the log, once, not to callers)."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"the database is unavailable ({cause}); try again later")
        self.cause = cause


MAX_ERRORS = 10  # lines of `describe_validation_error`; the rest are counted
PLAIN_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}")  # a key shown as it is
WORD = re.compile(r"\S+")
AT_AHEAD = re.compile(r"\S*@")
USER_INFO = re.compile(r"[^\s/@:]*:[^\s@]*@")
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# what an orchestrator's or a proxy's message may quote of a request: a token header's value
# (as "Name: value", or in JSON, a dict's repr or Go's http.Header, within quotes, brackets or
# braces), an Authorization header's credentials (Basic only when they decode to
# "user:password", Bearer only with a digit: "authorization: denied" is a message), a hook token
SECRET = re.compile(
    r"(?i)\b(?P<header>x-nomad-token|x-vault-token|x-deploy-hook-token)"
    r"(?P<sep>\\?['\"]?\s*[:=]\s*(?:\[\]string\{|[\[{(]|b?\\?['\"])*)(?P<value>[^'\",;\\\]})\r\n]+)"
    r"|\b(?P<basic>basic)\s+(?P<encoded>[A-Za-z0-9+/]{4,}={0,2})"
    r"|\b(?P<bearer>bearer)\s+(?=[A-Za-z0-9._~+/-]*\d)[A-Za-z0-9._~+/-]{16,}=*"
    rf"|\b{PREFIXED}"
)


def masked_credentials(text: str) -> str:
    """`text` with the user info of each URL in it masked (`user:***@`, or `***@` for a lone
    token): up to the URL's last "@" before the next URL or space, since a password pasted
    unencoded may hold "/", "@" or "#". In time linear in the text, which a caller may send."""
    return WORD.sub(_masked_word, text) if "://" in text else text


def masked_secrets(text: str) -> str:
    """`text` with the credentials a message may quote masked: a URL's user info
    (`masked_credentials`), a token header's value, an Authorization header's credentials
    and hook tokens. In time linear in the text."""
    return SECRET.sub(_masked_secret, masked_credentials(text))


def _masked_secret(found: re.Match[str]) -> str:
    if found["header"]:
        # a space masked with the value stays when an "@" follows in the word it would join: a
        # URL before it would take that "@" for the end of its user info when shown again
        spaced = any(c.isspace() for c in found["value"]) and AT_AHEAD.match(
            found.string, found.end()
        )
        kept = " " if spaced else ""
        return f"{found['header']}{found['sep']}***{kept}"
    if found["basic"]:
        try:
            decoded = base64.b64decode(found["encoded"], validate=True)
        except ValueError:
            return found.group()
        return f"{found['basic']} ***" if b":" in decoded else found.group()
    if found["bearer"]:
        return f"{found['bearer']} ***"
    return f"{PREFIX}***"


def _masked_word(word: re.Match[str]) -> str:
    parts = word.group().split("://")
    for i, part in enumerate(parts[1:], 1):
        userinfo, at, rest = part.rpartition("@")
        if at:
            user, colon, _ = userinfo.partition(":")
            kept = f"{user}:" if colon and not set(user) & set("/@") else ""
            parts[i] = f"{kept}***@{rest}"
    return "://".join(parts)


def one_line(text: str) -> str:
    """Text from elsewhere (an orchestrator, a plugin, a hook's caller) as shiphook stores, logs
    and shows it: the credentials in it masked (`masked_secrets`; first, as a tab or a line
    break may separate a credential from its scheme), its lines joined with "; ", a tab made a
    space and any other control or format character escaped (so that it can neither forge a
    log line nor drive or reorder a terminal that prints it)."""
    masked = masked_secrets(text)
    joined = "; ".join(line.strip() for line in masked.splitlines() if line.strip())
    if not joined.isprintable():  # the rare case, character by character
        joined = "".join(
            (" " if c.isspace() else c.encode("unicode_escape").decode("ascii"))
            if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")
            else c
            for c in joined
        )
    return joined


def describe_validation_error(
    exc, prefix: str = "", model: Any = None, also: Iterable[str] = ()
) -> list[str]:
    """One line per pydantic error (the first MAX_ERRORS): the dotted key path, what is wrong,
    and what was given; for an unknown key of `model` (the one validated), the keys it takes
    there, with `also` (keys of the same table that another model takes)."""
    errors = exc.errors(include_url=False)
    lines = []
    for error in errors[:MAX_ERRORS]:
        path = prefix
        for part in error["loc"]:
            if part == "[key]":  # pydantic's mark of an error in the key itself
                continue
            if isinstance(part, int) or not PLAIN_KEY.fullmatch(part):
                path += f"[{shown_key(part)}]"
            else:
                path += f".{part}" if path else part
        message = error["msg"].removeprefix("Value error, ")
        if (
            error["type"] not in {"missing", "extra_forbidden", "json_invalid"}  # json: the body
            and "input" in error
            and not _may_be_secret(error["loc"])
            and not _may_hold_a_password(error["input"])
            and not (
                isinstance(error["input"], dict)
                and any(_may_be_secret((k,)) for k in error["input"])
            )
        ):
            given = _shown_input(error["input"])
            if len(given) <= 60:
                message += f" (got {given})"
        if error["type"] == "extra_forbidden":
            message = "unknown key"
            keys = sorted({*_keys_at(model, error["loc"][:-1]), *also})
            if keys:
                message += f" (expected one of: {', '.join(keys)})"
        lines.append(f"{path}: {message}" if path else message)
    if len(errors) > MAX_ERRORS:
        lines.append(f"and {len(errors) - MAX_ERRORS} more errors")
    return lines


def _keys_at(annotation: Any, loc: tuple[int | str, ...]) -> list[str]:
    """The keys the model found at `loc` inside `annotation` takes (none known: [])."""
    for part in (*loc, None):
        while get_origin(annotation) in (Union, UnionType):  # an optional table
            models = [a for a in get_args(annotation) if _is_model(a)]
            annotation = models[0] if models else None
        if part is None:
            break
        if get_origin(annotation) in (dict, list):  # `part` is a table's name or an index
            annotation = get_args(annotation)[-1]
        elif _is_model(annotation) and part in annotation.model_fields:
            annotation = annotation.model_fields[part].annotation
        else:
            return []
    return list(annotation.model_fields) if _is_model(annotation) else []


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _shown_input(value: object) -> str:
    """A value that was given, as its JSON or TOML reads: text quoted and escaped, the rest as
    JSON (`null`, not Python's `None`); the credentials in it masked (`masked_secrets`)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        shown = repr(value)
    else:
        try:
            shown = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            shown = repr(value)
    return masked_secrets(shown)


def shown_key(key: int | str) -> str:
    """A key or index as an error shows it: a plain one as it is, any other `quoted` shorter."""
    if isinstance(key, int) or PLAIN_KEY.fullmatch(key):
        return str(key)
    return quoted(key, 40)


def quoted(text: str, limit: int = 60) -> str:
    """Text a caller sent, as an error quotes it: escaped and cut at `limit` characters, so that
    it can neither forge a log line nor fill one."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _may_hold_a_password(value: Any) -> bool:
    """Text like `user:password@host` without a scheme, which `masked_credentials` cannot tell
    from other text, alone or inside a list or table: not echoed."""
    if isinstance(value, list | tuple):
        return any(map(_may_hold_a_password, value))
    if isinstance(value, dict):
        return any(map(_may_hold_a_password, value.values()))
    return (
        isinstance(value, str)
        and SCHEME.match(value) is None
        and USER_INFO.match(value) is not None
    )


def _may_be_secret(loc: tuple[int | str, ...]) -> bool:
    """Nothing inside a job's environment (its values, or what was sent in its place) nor a
    credential option is echoed back (nor logged)."""
    keys = [str(part).lower() for part in loc]
    words = ("token", "password", "secret", "key", "environment")
    return "value" in keys or any(word in key for key in keys for word in words)
