"""Routes from the settings file, registered last so that the operator's word wins."""

from collections.abc import Iterable

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.routes import Route


class SettingsRoutes:
    def __init__(self, routes: Iterable[Route]):
        self.routes = list(routes)

    @hookimpl
    def register_routes(self) -> list[Route]:
        return self.routes
