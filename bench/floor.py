"""The floor for small requests: Tornado's HTTP server answering a constant.

No upstream, no logging, no metrics: what any Tornado-based proxy pays per
request before doing its job. On uvloop when it is installed, like the proxy.

    python bench/floor.py PORT
"""

import asyncio
import sys

from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler

TAGS = b'{"models": [{"name": "llama3.2:latest", "size": 2019393189}]}'


class Constant(RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(TAGS)

    post = get


async def main(port: int) -> None:
    HTTPServer(Application([(r"/.*", Constant)])).listen(port, "127.0.0.1")
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # the proxy without its speed extra runs on asyncio's loop too
        asyncio.run(main(int(sys.argv[1])))
    else:
        uvloop.run(main(int(sys.argv[1])))
