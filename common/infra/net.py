"""Which network addresses are public: the check behind every outbound request lorafleet
makes for a remote client (LoRA downloads asked through the API, webhooks), so that a client
cannot make the fleet reach into its own network (server-side request forgery)."""

from __future__ import annotations

import ipaddress
import socket

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
    """Every address ``host`` resolves to (OSError or UnicodeError when it does not)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
