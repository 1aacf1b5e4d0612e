"""What start-up tells the person who started the proxy: the address to use, what a first
look at each upstream found, the status page, whether access keys are on. One record;
readable lines on a terminal. `check` prints the same look, in more detail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .registry import parse_models, parse_version

if TYPE_CHECKING:
    from .pool import Member, Pool
    from .proxy import Proxy

log = logging.getLogger("tornado-ollama-proxy")

FIRST_LOOK_SECONDS = 2.0  # the first look never holds up start-up for longer than this
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}  # a wildcard bind, and its loopback


@dataclass(frozen=True)
class Look:
    """One upstream as a first look found it: its version and models, or what went wrong.
    `address` is its host and port: never its URL, which may hold a secret."""

    name: str
    address: str
    version: str | None = None
    models: tuple[str, ...] | None = None
    failure: str | None = None

    @property
    def reachable(self) -> bool:
        return self.version is not None

    def said(self) -> str:
        """What the look found, in a few words."""
        if self.version is None:
            return f"{self.failure} — is Ollama running at {self.address}?"
        models = "its models unread" if self.models is None else f"{len(self.models)} models"
        return f"Ollama {self.version}, {models}"


async def look_at(pool: Pool, within: float) -> list[Look]:
    """Ask every upstream its version and its models at once, each within `within` seconds."""
    return list(await asyncio.gather(*(_look(pool, member, within) for member in pool.members)))


async def _look(pool: Pool, member: Member, within: float) -> Look:
    pod = member.pod
    version, failure = await pool.ask(member, "/api/version", parse_version, within)
    if version is None:
        return Look(pod.name, pod.host, failure=failure)
    listed, _ = await pool.ask(member, "/api/tags", parse_models, within)
    return Look(pod.name, pod.host, version, None if listed is None else tuple(sorted(listed)))


def addresses(host: str, port: int, environ: Mapping[str, str], local: list[str]) -> list[str]:
    """Where to reach the proxy, the one to use first: on Runpod, the pod's public address;
    for a wildcard bind, loopback and then this machine's other `local` addresses."""
    found = []
    pod_id = environ.get("RUNPOD_POD_ID")
    if pod_id:
        found.append(f"https://{pod_id}-{port}.proxy.runpod.net")
    if host in WILDCARDS:
        found.append(f"http://{WILDCARDS[host]}:{port}")
        found += [f"http://{_bracketed(address)}:{port}" for address in local]
    else:
        found.append(f"http://{_bracketed(host)}:{port}")
    return found


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def local_addresses() -> list[str]:
    """This machine's addresses other than loopback, as its name resolves (none if it does not)."""
    found: list[str] = []
    with suppress(OSError):
        for *_, sockaddr in socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM):
            address = str(sockaddr[0])
            if not ipaddress.ip_address(address.split("%")[0]).is_loopback and address not in found:
                found.append(address)
    return found


def summary(proxy: Proxy, looks: list[Look], reach: list[str], event_loop: str) -> tuple[dict[str, Any], list[str]]:
    """The start-up record's fields, and the same as readable lines."""
    settings = proxy.settings
    authenticator = proxy.authenticator
    generated = getattr(authenticator, "generated", None)
    status_page = None if settings.status_path is None else reach[0] + settings.status_path
    if authenticator is None:
        keys, keys_line = "off", "off: anyone who can reach the port can use it"
    elif generated is not None:
        keys, keys_line = "generated", f"on, one generated key (kept in {generated.path})"
    else:
        names = list(getattr(authenticator, "names", []))
        keys, keys_line = "on", f"on, {len(names)} key{'s' if len(names) != 1 else ''}: " + ", ".join(names)
    fields = {
        "version": __version__,
        "address": reach[0],
        "addresses": reach,
        "status_page": status_page,
        "upstreams": [
            {"name": look.name, "address": look.address, "reachable": look.reachable}
            | ({"version": look.version, "models": len(look.models or ())} if look.reachable else {})
            | ({} if look.reachable else {"failure": look.failure})
            for look in looks
        ],
        "access_keys": keys,
        "key_file": None if generated is None else str(generated.path),
        "workers": settings.worker_count,
        "event_loop": event_loop,
    }
    also = f"  (also {', '.join(reach[1:])})" if len(reach) > 1 else ""
    lines = [f"Address:      {reach[0]}{also}"]
    if status_page is not None:
        lines.append(f"Status page:  {status_page}")
    lines += [f"Upstream:     {look.name} at {look.address}: {look.said()}" for look in looks]
    lines.append(f"Access keys:  {keys_line}")
    lines.append(f"Workers:      {settings.worker_count}, event loop {event_loop}")
    return fields, lines


async def announce(proxy: Proxy, port: int, event_loop: str, environ: Mapping[str, str]) -> None:
    """Look at the upstreams (briefly: the proxy is serving already), warn of each that
    cannot be reached, and log the summary."""
    looks = await look_at(proxy.pool, FIRST_LOOK_SECONDS)
    for look in looks:
        if not look.reachable:
            log.warning(
                look.said(),
                extra={"upstream": look.name, "address": look.address},
            )
    reach = addresses(proxy.settings.host, port, environ, local_addresses())
    fields, lines = summary(proxy, looks, reach, event_loop)
    log.info(f"tornado-ollama-proxy {__version__} is ready", extra={**fields, "lines": lines})
