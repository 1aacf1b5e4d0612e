"""A front proxy that delivers every request as GET, as the platform in front of a pod does.

It keeps the body (the case the proxy can repair), sets the Host a platform
would, adds the forwarding headers Cloudflare adds, and streams answers back.
"""

from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.web import Application, RequestHandler

from tornado_ollama_proxy.headers import end_to_end

PUBLIC_HOST = "abc123xyz-8000.proxy.runpod.net"


class GetOnlyHandler(RequestHandler):
    SUPPORTED_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

    def initialize(self, target: str, client: AsyncHTTPClient) -> None:
        self.target = target
        self.client = client

    def compute_etag(self):
        return None

    async def get(self):
        headers = dict(end_to_end(self.request.headers.get_all()))
        headers.update({"Host": PUBLIC_HOST, "CF-Connecting-IP": "203.0.113.7", "X-Forwarded-Proto": "https"})
        headers.pop("Content-Length", None)
        request = HTTPRequest(
            self.target + self.request.uri,
            method="GET",
            headers=headers,
            body=self.request.body or None,
            allow_nonstandard_methods=True,
            follow_redirects=False,
            decompress_response=False,
            request_timeout=0,
            header_callback=self.on_header,
            streaming_callback=self.on_chunk,
        )
        self.status_seen = False
        await self.client.fetch(request, raise_error=False)

    head = post = put = patch = delete = options = get

    def on_header(self, line):
        if not self.status_seen:
            self.status_seen = True
            self.clear_header("Content-Type")
            _, code, reason = line.strip().split(" ", 2)
            self.set_status(int(code), reason)
        elif line.strip():
            name, value = line.strip().split(": ", 1)
            if name.lower() not in ("transfer-encoding", "connection"):
                self.add_header(name, value)

    async def on_chunk(self, chunk):
        self.write(chunk)
        await self.flush()


def make_front(target: str) -> Application:
    client = AsyncHTTPClient(force_instance=True, max_clients=1000)
    return Application([(r".*", GetOnlyHandler, {"target": target, "client": client})])
