"""Allow-lists that hold: URLs and server paths are parsed and normalised before they are
compared, and anything ambiguous is refused before it is parsed at all.

A URL is checked on its components: scheme, host, port (default ports made explicit) and path
(percent-decoded, dot segments resolved), against each allowed prefix normalised the same way,
whole path segments only. The server then fetches the URL rebuilt from those components, so
what it fetches is what was checked. Refused up front (400): control characters, spaces,
backslashes and fragments (`#`) anywhere, user info, percent-encoded slashes, backslashes, NULs
or dots in the path (`%2f`, `%5c`, `%00`, `%2e`), non-ASCII or trailing-dot hosts, non-numeric
ports. A server path
is refused on NUL or control characters, then resolved (symlinks too) before the check.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from guardrail.serve.errors import BadRequest

DEFAULT_PORTS = {"http": 80, "https": 443}
_UNSAFE = re.compile(r"[\x00-\x20\x7f\\#]")               # controls, space, backslash, #
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENCODED_TRAPS = re.compile(r"%(2f|5c|00|2e)", re.I)        # / \ NUL . hidden by encoding
_HOST = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$|"
                   r"^\[[0-9a-f:.]+\]$")


@dataclass(frozen=True)
class Url:
    """A normalised http(s) URL: what is compared and what is fetched."""

    scheme: str
    host: str
    port: int
    path: str          # decoded, dot segments resolved, starts with "/"
    query: str

    def under(self, prefix: Url) -> bool:
        """On `prefix`'s origin and under its path, whole segments only."""
        if (self.scheme, self.host, self.port) != (prefix.scheme, prefix.host, prefix.port):
            return False
        root = prefix.path.rstrip("/") + "/"
        return prefix.path in ("", "/") or self.path == prefix.path.rstrip("/") \
            or self.path.startswith(root)

    def geturl(self) -> str:
        default = DEFAULT_PORTS[self.scheme] == self.port
        netloc = self.host if default else f"{self.host}:{self.port}"
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{netloc}{quote(self.path, safe='/')}{query}"


def parse_url(url: str) -> Url:
    """Normalise an http(s) URL or raise BadRequest naming what is ambiguous."""
    if _UNSAFE.search(url):
        raise BadRequest("the URL holds control characters, spaces or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise BadRequest("the URL's host or port cannot be read") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise BadRequest("only http and https URLs are fetched")
    if "@" in parts.netloc:
        raise BadRequest("URLs with user info (user@host) are refused")
    host = (parts.hostname or "").lower()
    if not host or not host.isascii() or host.endswith(".") or not _HOST.match(
            host if ":" not in host else f"[{host}]"):
        raise BadRequest("the URL's host is empty or ambiguous")
    if _ENCODED_TRAPS.search(parts.path):
        raise BadRequest("the URL's path hides /, \\, NUL or . in percent-encoding")
    path = unquote(parts.path, errors="strict") if parts.path else "/"
    if _CONTROL.search(path) or "\\" in path or re.search(r"%[0-9a-f]{2}", path, re.I):
        raise BadRequest("the URL's path is encoded twice or holds control characters")
    resolved = posixpath.normpath("/" + path.lstrip("/"))
    resolved = "/" + resolved.lstrip("/")                 # normpath keeps a leading "//"
    if path.endswith("/") and resolved != "/":
        resolved += "/"
    return Url(scheme, host if ":" not in host else f"[{host}]",
               port if port is not None else DEFAULT_PORTS[scheme], resolved, parts.query)


def check_path(path: str) -> str:
    """A server path, resolved (symlinks included); BadRequest on NUL or control characters."""
    if _CONTROL.search(path):
        raise BadRequest("the path holds NUL or control characters")
    return os.path.realpath(path)
