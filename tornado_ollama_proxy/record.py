"""A request's access record: written once when the request ends, filled in on the way."""

from __future__ import annotations

from typing import Any


class AccessRecord:
    """One request's access record, filled in by the parts that handle it.

    Written once when the request ends (see `account`); bodies never, request
    headers only those `log_headers` names.
    """

    def __init__(self, request_id: str, client: str, method_in: str, path: str, route: str):
        self.request_id = request_id
        self.client = client
        self.key: str | None = None  # the access key's name, when keys are required
        self.method_in = method_in
        self.method_out: str | None = None  # set when the request goes upstream
        self.path = path
        self.route = route  # the route table's entry, "unmapped" outside it, fixed names for the proxy's own
        self.model: str | None = None  # what the body asks for, when it says
        self.stream: bool | None = None
        self.upstream: str | None = None  # the pod the last attempt went to, by name
        self.attempts = 0  # how many pods (or times) the request went to
        self.queued_ms: float | None = None  # a generation's wait for a free slot, where pods have slots
        self.upstream_status: int | None = None
        self.status = 0  # as sent; for an error told in-band after a heartbeat's 200, the error's
        self.in_band = False  # an error was told in-band, after the proxy's own head
        self.bytes_in = 0
        self.bytes_out = 0
        self.ttfb_ms: float | None = None
        self.duration_ms = 0.0
        self.chunks = 0
        self.heartbeats = 0
        # What Ollama reported at the end of a generation or embedding:
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.tokens_per_s: float | None = None
        self.load_ms: float | None = None
        self.ttft_ms: float | None = None  # to the first body byte of a streamed generation
        self.outcome: str | None = None

    def fields(self) -> dict[str, Any]:
        return vars(self)


def failed(record: AccessRecord) -> bool:
    """Whether a request ended in an error: its status or the upstream's (told in-band
    after a heartbeat), or an upstream that failed or fell silent."""
    return (
        record.status >= 400 or (record.upstream_status or 0) >= 400 or record.outcome in ("upstream_error", "timeout")
    )
