"""Which network addresses are public, and the one way lorafleet connects to a host it has
checked: every outbound request made for a remote client (LoRA downloads asked through the
API, webhooks) resolves the host once, refuses it unless every address is public, and then
connects to the address it checked, so that a client cannot make the fleet reach into its own
network (server-side request forgery), not even with a name that resolves elsewhere the
second time it is looked up (DNS rebinding)."""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lorafleet.common.schema.errors import InvalidInput

if TYPE_CHECKING:
    import httpx

_EMBEDDING_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("2002::/16"))


def is_public_address(text: str) -> bool:
    """Whether an address is on the public internet (not loopback, private, link-local,
    reserved, nor an IPv6 form that carries an IPv4 address: mapped, NAT64, 6to4)."""
    address = ipaddress.ip_address(text.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public_address(str(address.ipv4_mapped))
        if any(address in network for network in _EMBEDDING_IPV4):
            return False
    return address.is_global


def resolve(host: str) -> list[str]:
    """Every address ``host`` resolves to, in the system's order of preference (OSError or
    UnicodeError when it does not). Every lookup lorafleet checks goes through here."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(info[4][0] for info in infos))


def checked_address(
    url: str,
    *,
    error: type[InvalidInput],
    field: str,
    allowed: str | None = None,
    allow_private: bool = False,
) -> str:
    """The one address to connect to for ``url``'s host: it is resolved once, and refused with
    ``error`` naming ``field`` when it does not resolve or, unless ``allow_private``, when any
    of its addresses is not public. Connect to the returned address with ``send_pinned``."""
    host = urlsplit(url).hostname or ""
    try:
        addresses = resolve(host)
    except (OSError, UnicodeError) as exc:
        raise error(f"{url}: cannot resolve {host!r} ({exc})", field=field, allowed=allowed) from None
    private = [] if allow_private else [a for a in addresses if not is_public_address(a)]
    if private or not addresses:
        raise error(
            f"{url}: {host} resolves to {(private or ['nothing'])[0]}, not a public address",
            field=field,
            allowed=allowed,
        )
    return addresses[0]


def send_pinned(
    http: httpx.Client,
    method: str,
    url: str,
    address: str | None,
    *,
    stream: bool = False,
    **request: Any,
) -> httpx.Response:
    """``method url`` sent through ``http`` over a connection to ``address`` (from
    ``checked_address``; None: the host resolved as usual), the name kept in the Host header
    and as the TLS server name, so that an https certificate is checked against the name."""
    import httpx

    target = httpx.URL(url)
    if address is None:
        return http.send(http.build_request(method, target, **request), stream=stream)
    headers = httpx.Headers(request.pop("headers", None))
    headers["Host"] = target.netloc.decode("ascii")
    pinned = http.build_request(
        method,
        target.copy_with(host=address),
        headers=headers,
        extensions={**request.pop("extensions", {}), "sni_hostname": target.host},
        **request,
    )
    return http.send(pinned, stream=stream)
