"""The plugin manager: built-ins first, then installed packages, then the plugins folder.

pluggy calls the last-registered plugin first, and route entries registered
later replace earlier ones, so users' plugins win over the built-ins.
"""

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .default_plugins import DEFAULT_PLUGINS
from .default_plugins.settings_routes import SettingsRoutes
from .routes import Route, RouteError, RouteTable, parse_routes
from .settings import Settings


class PluginError(RuntimeError):
    """A plugin that cannot be loaded or gives bad data; the message names it."""


def load_plugins_folder(pm: pluggy.PluginManager, folder: Path) -> list[str]:
    """Register every ``*.py`` file in `folder` (sorted by name) as a plugin."""
    names = []
    for path in sorted(folder.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"{hookspecs.PROJECT}_plugins.{path.stem}", path)
        assert spec is not None and spec.loader is not None  # a *.py file always has both
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            pm.register(module, name=str(path))
        except Exception as error:
            raise PluginError(f"plugin {path} failed to load: {type(error).__name__}: {error}") from None
        names.append(str(path))
    return names


def make_plugin_manager(settings: Settings) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    folder = Path(settings.plugins_dir)
    if folder.is_dir():
        load_plugins_folder(pm, folder)
    elif settings.plugins_dir != Settings.plugins_dir:
        raise PluginError(f"plugins_dir: {folder} is not a folder")
    pm.register(SettingsRoutes(settings.routes), name="settings")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as error:
        raise PluginError(f"plugin {pm.get_name(error.plugin)}: {error}") from None
    return pm


def build_route_table(pm: pluggy.PluginManager) -> RouteTable:
    """Collect every plugin's routes in registration order, naming a plugin whose entry is bad."""
    routes: list[Route] = []
    for impl in pm.hook.register_routes.get_hookimpls():
        try:
            entries: list[Any] = list(impl.function() or ())  # type: ignore[call-overload]
        except Exception as error:
            raise PluginError(
                f"plugin {impl.plugin_name}: register_routes failed: {type(error).__name__}: {error}"
            ) from None
        try:
            routes.extend(parse_routes(entries))
        except RouteError as error:
            raise PluginError(f"plugin {impl.plugin_name}: route {error}") from None
    return RouteTable(routes)
