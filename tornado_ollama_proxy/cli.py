"""The command line: ``tornado-ollama-proxy [check] [--settings FILE] [--host H] [--port N]
[--upstream URL] [--workers N]``, and ``--version``."""

import argparse
import asyncio
import functools
import logging
import os
import sys

from . import __version__
from .app import make_app
from .check import check
from .clients import is_loopback
from .generated_key import GeneratedKey
from .logs import configure_logging, effective_configuration
from .plugins import PluginError, make_plugin_manager
from .server import loop_factory, serve
from .settings import DEFAULT_FILE, SettingsError, load_settings
from .startup import announce
from .tornado_private import IncompatibleTornado, require
from .workers import Supervisor, inherited_sockets

PROG = "tornado-ollama-proxy"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Streaming reverse proxy that restores the HTTP methods of Ollama's API.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "command",
        nargs="?",
        choices=["serve", "check"],
        default="serve",
        help="serve (the default), or check: validate the settings, reach every upstream, say what would be "
        "served; exit 0 when an upstream answers, 1 when none does, 2 on a settings error",
    )
    parser.add_argument("--settings", metavar="FILE", help=f"settings file (default: ./{DEFAULT_FILE} when present)")
    parser.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", help="port to listen on (default 8000, or $PORT)")
    parser.add_argument("--upstream", metavar="URL", help="Ollama's URL (default http://127.0.0.1:11434)")
    parser.add_argument("--workers", help="processes serving the port (default 1; 0 is one per core)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = {key: getattr(args, key) for key in ("host", "port", "upstream", "workers") if getattr(args, key)}
    if args.command == "check":
        return check(args.settings, flags)
    try:
        require()
        settings = load_settings(args.settings, flags=flags)
        pm = make_plugin_manager(settings)
        configure_logging(pm, settings)  # before the plugins' own start-up lines
        app = make_app(settings, pm)
        new_loop = loop_factory(settings.event_loop)
    except (SettingsError, PluginError, IncompatibleTornado) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    proxy = app.settings["proxy"]
    log = logging.getLogger(PROG)
    event_loop = "asyncio" if new_loop is None else "uvloop"
    sockets = inherited_sockets()
    worker = sockets is not None  # its parent said all this already
    generated = getattr(proxy.authenticator, "generated", None)
    if generated is not None and not worker:
        tell_generated_key(log, generated)
    elif proxy.authenticator is None and not is_loopback(settings.host):
        log.warning(
            "no access keys: anyone who can reach this port can use, pull and delete models",
            extra={"host": settings.host, "fix": "set api_keys, api_keys_file or OLLAMA_PROXY_API_KEYS (see README)"},
        )
    log.debug(
        "starting",
        extra={
            "settings": effective_configuration(settings),
            "upstreams": [pod.name for pod in proxy.pool.pods],
            "plugins": [name for name, _ in pm.list_name_plugin()],
            "routes": len(proxy.routes),
            "event_loop": event_loop,
        },
    )

    tell = functools.partial(announce, proxy, event_loop=event_loop, environ=os.environ)  # with the port
    if not worker and settings.worker_count > 1:
        return Supervisor(settings, sys.argv[1:] if argv is None else argv, tell).run()
    with asyncio.Runner(loop_factory=new_loop) as runner:
        runner.run(serve(app, sockets, announce=None if worker else tell))
    return 0


def tell_generated_key(log: logging.Logger, generated: GeneratedKey) -> None:
    """Say that a generated key is required and where it is kept (never the key, in a log
    line); on a terminal, show the key once, with how to use it."""
    log.warning(
        "access key required: none is configured and this address is public, so a generated key is used",
        extra={
            "key_file": str(generated.path),
            "made_now": generated.created,
            "fix": "set api_keys to choose keys, or open: true to serve anyone",
        },
    )
    if sys.stdout.isatty():
        print(
            f"\n  Access key (kept in {generated.path}): {generated.key}\n"
            f"  ollama Python client:  OLLAMA_API_KEY={generated.key}\n"
            f"  anything else:         Authorization: Bearer {generated.key}\n",
            flush=True,
        )
