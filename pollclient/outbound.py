"""What a job may send to the upstream: OpenAI's message keys only, and no image URL on a private network.

An upstream that fetches image URLs would otherwise reach the worker owner's network (a
router, a NAS, a cloud's metadata service at 169.254.169.254) on behalf of any gateway user.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], list[str]]

MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")
# A content part is {"type": T, T: payload}; for an object payload, the keys it may carry.
PART_KEYS: dict[str, tuple[str, ...]] = {
    "text": (), "refusal": (), "image_url": ("url", "detail"), "input_audio": ("data", "format"),
}
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # an IPv4 address in its last 32 bits
# Characters URL parsers disagree on (WHATWG reads a backslash as a slash; Python does not).
AMBIGUOUS = frozenset("\\\x7f") | frozenset(chr(c) for c in range(0x21))


class UnsafeRequest(ValueError):
    """The job names an image URL this worker does not let its upstream fetch."""


def resolve_host(host: str) -> list[str]:
    """Return every address the host name resolves to here (what the upstream would most likely reach)."""
    return [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)]


def outbound_request(request: dict[str, Any], allow_private_image_urls: bool = False,
                     resolve: Resolver = resolve_host) -> dict[str, Any]:
    """Return the request with its messages cleaned; raise UnsafeRequest for an image URL on a private network."""
    messages = request.get("messages")
    if not isinstance(messages, list):
        return request
    cleaned = [_message(m) for m in messages if isinstance(m, dict)]
    if not allow_private_image_urls:
        for i, message in enumerate(cleaned):
            for j, part in enumerate(message["content"] if isinstance(message.get("content"), list) else []):
                if part.get("type") == "image_url":
                    check_image_url(part["image_url"].get("url"), f"messages[{i}].content[{j}].image_url.url", resolve)
    return {**request, "messages": cleaned}


def _message(message: dict[str, Any]) -> dict[str, Any]:
    out = {key: message[key] for key in MESSAGE_KEYS if key in message}
    if isinstance(out.get("content"), list):
        out["content"] = [p for p in map(_part, out["content"]) if p]
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_tool_call(c) for c in out["tool_calls"] if isinstance(c, dict)]
    return out


def _part(part: Any) -> dict[str, Any] | None:
    """Keep a content part's known keys; drop a part of a type OpenAI does not define."""
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(kind, str) or kind not in PART_KEYS or kind not in part:
        return None
    value = part[kind]
    if PART_KEYS[kind]:
        if kind == "image_url" and isinstance(value, str):
            value = {"url": value}  # the old string form
        if not isinstance(value, dict):
            return None
        value = {key: value[key] for key in PART_KEYS[kind] if key in value}
    return {"type": kind, kind: value}


def _tool_call(call: dict[str, Any]) -> dict[str, Any]:
    out = {key: call[key] for key in ("id", "type") if key in call}
    if isinstance(call.get("function"), dict):
        out["function"] = {k: call["function"][k] for k in ("name", "arguments") if k in call["function"]}
    return out


def check_image_url(url: Any, where: str, resolve: Resolver) -> None:
    """Raise UnsafeRequest unless url is a data: URL or an http(s) URL whose host has only public addresses."""
    if isinstance(url, str) and url[:5].lower() == "data:":
        return  # inline: nothing is fetched
    unclear = UnsafeRequest(f"{where} is not a URL this worker can check, so the job was not sent on.")
    if not isinstance(url, str) or any(c in AMBIGUOUS for c in url):
        raise unclear
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket
        raise unclear from None
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise UnsafeRequest(f"{where} must be an http(s) or data: URL; this worker does not fetch "
                            f"{parts.scheme or 'it'}.")
    if "@" in parts.netloc:
        raise UnsafeRequest(f"{where} carries user info; this worker does not fetch image URLs with credentials.")
    try:
        names = [host] if _is_literal(host) else resolve(host)
        addresses = [ipaddress.ip_address(name) for name in names]
    except (OSError, UnicodeError, ValueError):
        addresses = []
    if not addresses:
        raise UnsafeRequest(f"{where}: the image host {host} cannot be resolved by this worker, so the job was "
                            "not sent on.")
    if not all(map(is_public_address, addresses)):
        raise UnsafeRequest(f"{where}: the image host {host} is a private, loopback, link-local or reserved "
                            "address; this worker does not fetch images from its own network.")


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_public_address(address: Address) -> bool:
    """Tell whether an address is public unicast (not private, loopback, link-local, multicast, reserved, ...)."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 form of an IPv4 address (::ffff:127.0.0.1, 6to4, NAT64) reaches that IPv4 address.
        embedded = address.ipv4_mapped or address.sixtofour
        if address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(embedded):
            return False
    return address.is_global and not (
        address.is_private or address.is_loopback or address.is_link_local or address.is_unspecified
        or address.is_multicast or address.is_reserved
    )
