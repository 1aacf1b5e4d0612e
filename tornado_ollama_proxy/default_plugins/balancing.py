"""The built-in load balancer: free slots, loaded model, conversation, least loaded."""

from collections.abc import Callable, Sequence

from tornado_ollama_proxy import hookimpl
from tornado_ollama_proxy.balancer import PodView, Wanted, default_chooser
from tornado_ollama_proxy.settings import Settings


@hookimpl
def choose_upstream(settings: Settings) -> Callable[[Sequence[PodView], Wanted], list[PodView]]:
    return default_chooser()
