"""Hook tokens: 256 random bits, a recognisable prefix for secret scanners, a checksum.

`shk_` + 43 base62 characters of randomness + 6 base62 characters of CRC-32 over them, in the
style of GitHub's tokens: a mistyped or truncated token is rejected without a database lookup,
and a leaked one is easy to find by pattern. Only the SHA-256 digest is ever stored.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib

PREFIX = "shk_"
TOKEN_HEADER = "X-Deploy-Hook-Token"  # the header a hook request carries its token in
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BODY_LEN = 43  # ceil(256 / log2(62))
_CHECK_LEN = 6  # ceil(32 / log2(62))
TOKEN_PATTERN = rf"{PREFIX}[0-9A-Za-z]{{{_BODY_LEN + _CHECK_LEN}}}"
_SHAPE = re.compile(TOKEN_PATTERN, re.ASCII)
# a token or most of one, with its prefix (or the prefix's underscore percent-encoded)
PREFIXED = rf"{PREFIX[:-1]}(?:_|%5F|%255F)[0-9A-Za-z]{{8,}}"
_PREFIXED = re.compile(PREFIXED, re.I)
# that, or a run as long as most of a token's body without it
_LOOKALIKE = re.compile(rf"{PREFIXED}|[0-9A-Za-z]{{32,}}", re.I)


def redacted(text: str) -> str:
    """`text` with every token in it (whole or in part) masked: for what shiphook shows of a
    request, where a client may have put its token by mistake (the path)."""
    return _LOOKALIKE.sub(f"{PREFIX}***", text)


def holds_token(text: str) -> bool:
    """Whether `text` holds a token, or most of one, with its prefix."""
    return _PREFIXED.search(text) is not None


def looks_like_token(text: str) -> bool:
    """Whether `redacted` would mask anything in `text`."""
    return _LOOKALIKE.search(text) is not None


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(_ALPHABET[rest])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECK_LEN)


def new_token(random_bytes=secrets.token_bytes) -> str:
    """A fresh token; `random_bytes` is injectable for tests."""
    body = _base62(int.from_bytes(random_bytes(32), "big"), _BODY_LEN)
    return PREFIX + body + _checksum(body)


def is_well_formed(token: str) -> bool:
    """Prefix, length, alphabet and checksum are right: worth a database lookup."""
    if _SHAPE.fullmatch(token) is None:
        return False
    body, check = token[len(PREFIX) : -_CHECK_LEN], token[-_CHECK_LEN:]
    return secrets.compare_digest(_checksum(body), check)


def digest(token: str) -> str:
    """What the database stores and looks up: SHA-256, hex."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()
