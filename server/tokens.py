"""Bearer tokens and their scopes, from a file (a mounted Secret) that may change while serving.

The format, one token a line::

    # comments and blank lines are ignored
    <token> <scope>[,<scope>...]

e.g. ``s3cr3t-0123456789abcdef infer,admin``. Scopes are ``infer`` and ``admin`` (see
:mod:`tlserve.server.auth`); a token is at least :data:`MIN_TOKEN_LENGTH` printable characters without
spaces. A malformed file is refused with the line number, never the token. Lookups compare SHA-256
digests with :func:`hmac.compare_digest` against every known token, so their time does not depend
on how much of a token was right.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SCOPES = ("infer", "admin")
MIN_TOKEN_LENGTH = 16
CHECK_INTERVAL = 1.0  # seconds between looks at the file


class TokenFileError(ValueError):
    """The token file cannot be used; the message never contains a token."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(text: str, source: str = "token file") -> dict[bytes, frozenset[str]]:
    """SHA-256 digest of each token -> its scopes; :class:`TokenFileError` on the first bad line."""
    tokens: dict[bytes, frozenset[str]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        where = f"{source} line {number}"
        if len(fields) != 2:
            raise TokenFileError(f"{where}: expected '<token> <scope>[,<scope>...]' (2 fields, got {len(fields)})")
        token, scope_list = fields
        if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or not token.isascii():
            raise TokenFileError(f"{where}: a token must be at least {MIN_TOKEN_LENGTH} printable ASCII characters")
        scopes = frozenset(s for s in scope_list.split(",") if s)
        unknown = sorted(scopes - set(SCOPES))
        if unknown or not scopes:
            raise TokenFileError(f"{where}: scopes must be a comma-separated list of {', '.join(SCOPES)}")
        digest = _digest(token)
        if digest in tokens:
            raise TokenFileError(f"{where}: the same token appears twice")
        tokens[digest] = scopes
    if not tokens:
        raise TokenFileError(f"{source} holds no token")
    return tokens


class TokenFile:
    """The tokens of ``--token-file``; :meth:`watch` re-reads the file when it changes."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._signature = self._stat()
        self._tokens = self._read()  # raises TokenFileError: refuse to start

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> Mapping[bytes, frozenset[str]]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(f"cannot read the token file {self.path} ({exc.__class__.__name__})") from None
        return parse_tokens(text, str(self.path))

    def scopes(self, token: str) -> frozenset[str] | None:
        """The scopes of ``token``, or None when it is not known (constant time in the token's content)."""
        digest = _digest(token)
        found: frozenset[str] | None = None
        for known, scopes in self._tokens.items():
            if hmac.compare_digest(known, digest):
                found = scopes
        return found

    def check(self) -> bool:
        """Re-read the file if it changed; True when new tokens are in use. A bad file keeps the old ones."""
        signature = self._stat()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            self._tokens = self._read()
        except TokenFileError as exc:
            log.error("token file changed but is not usable, keeping the previous tokens: %s", exc)
            return False
        log.info("token file reloaded: %d tokens", len(self._tokens))
        return True

    async def watch(self, interval: float = CHECK_INTERVAL) -> None:
        """Check the file every ``interval`` seconds, off the event loop, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.check)
