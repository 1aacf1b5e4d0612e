"""A streaming reverse proxy that gives Ollama's API back its HTTP methods."""

from .hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
