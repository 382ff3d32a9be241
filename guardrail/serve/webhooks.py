"""Where a webhook may go: `jobs.webhook_allow` plus a rule on addresses, checked when the job
is created and again (after a fresh DNS lookup) right before each delivery, which then connects
to the address that was checked.

`webhook_allow` entries are URL prefixes. A bare scheme (`https://`, the default with
`http://`) allows any host of that scheme, but only where every address the host resolves to
is public: loopback, private, link-local (cloud metadata at 169.254.169.254 included), shared,
reserved and multicast addresses are refused, in every spelling (decimal, octal, IPv4-mapped
IPv6), since the check is on resolved addresses. An entry that names a host
(`http://10.0.0.5:9000/hooks`) allows that host wherever it points: the operator said so.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from guardrail.errors import UsageError
from guardrail.serve.allow import DEFAULT_PORTS, Url, parse_url
from guardrail.serve.errors import BadRequest, Forbidden

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Rule:
    scheme: str
    prefix: Url | None             # None: any host of the scheme, public addresses only

    def matches(self, url: Url) -> bool:
        return url.scheme == self.scheme and (self.prefix is None or url.under(self.prefix))


@dataclass(frozen=True)
class Destination:
    """A checked webhook target: connect to `address`, present `url`'s host."""

    url: Url
    address: str

    def connect_url(self) -> str:
        """The URL with the checked address in place of the host (the Host header and TLS
        name stay the original host)."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        return Url(self.url.scheme, host, self.url.port, self.url.path, self.url.query).geturl()

    def headers(self) -> dict[str, str]:
        default = self.url.port == DEFAULT_PORTS[self.url.scheme]
        return {"host": self.url.host if default else f"{self.url.host}:{self.url.port}"}

    def extensions(self) -> dict[str, str]:
        return {"sni_hostname": self.url.host.strip("[]")} if self.url.scheme == "https" else {}


def rules(entries: list[str]) -> list[Rule]:
    """Parse `jobs.webhook_allow` (UsageError on an entry that cannot be read)."""
    out = []
    for entry in entries:
        scheme, sep, rest = entry.partition("://")
        if sep and scheme.lower() in DEFAULT_PORTS and rest == "":
            out.append(Rule(scheme.lower(), None))
            continue
        try:
            url = parse_url(entry)
        except BadRequest as err:
            raise UsageError(f"jobs.webhook_allow: {entry!r}: {err}") from None
        out.append(Rule(url.scheme, url))
    return out


def public(address: _Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_global and not address.is_multicast


def check(url: str, allow: list[Rule]) -> tuple[Url, bool]:
    """Syntax and prefix: (the parsed URL, whether a rule names its host). Raises 400/403."""
    parsed = parse_url(url)
    matched = [r for r in allow if r.matches(parsed)]
    if not matched:
        raise Forbidden("webhook_url is not allowed (see jobs.webhook_allow)")
    return parsed, any(r.prefix is not None for r in matched)


def resolve(url: Url, named: bool) -> Destination:
    """Blocking DNS lookup; every address must pass unless a rule names the host. Raises
    Forbidden (403) for a refused address and for a host that does not resolve."""
    host = url.host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, url.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise Forbidden(f"webhook host {host!r} does not resolve") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses:
        raise Forbidden(f"webhook host {host!r} does not resolve")
    if not named:
        bad = sorted({str(a) for a in addresses if not public(a)})
        if bad:
            raise Forbidden(f"webhook host {host!r} resolves to a non-public address "
                            f"({', '.join(bad)}); name it in jobs.webhook_allow to allow it")
    addresses.sort(key=lambda a: a.version)        # IPv4 first: the more often reachable
    return Destination(url, str(addresses[0]))
