"""The chat's long-poll contract on Tornado (coroutines on asyncio), for bench.py --compare.

    pip install tornado && python examples/tornado_server.py [--port 0]
"""
import argparse
import asyncio
import json
import time

import tornado.web

from asyncio_stream import Stream

chat = Stream(200)


class Updates(tornado.web.RequestHandler):
    async def get(self):
        text = self.get_query_argument("cursor", None)
        if text is not None and not text.isdecimal():
            raise tornado.web.HTTPError(400)
        items, cursor, gap = await chat.wait(None if text is None else int(text), self.settings["poll_timeout"])
        self.write({"messages": items, "cursor": cursor, **({"gap": True} if gap else {})})


class Messages(tornado.web.RequestHandler):
    def post(self):
        data = json.loads(self.request.body or b"{}")
        self.set_status(201)
        self.write(chat.publish(nick=data.get("nick", "anonymous"), body=data["body"], time=time.time()))


class Status(tornado.web.RequestHandler):
    def get(self):
        waiting = chat.waiting
        self.write({"waiting": waiting, "streams": {"chat": {"last_id": chat.last_id, "waiting": waiting}}})


async def main():
    flags = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    flags.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    flags.add_argument("--poll-timeout", type=float, default=25, help="seconds a poll waits (default: 25)")
    args = flags.parse_args()
    app = tornado.web.Application([("/chat/updates", Updates), ("/chat/messages", Messages), ("/status", Status)],
                                  poll_timeout=args.poll_timeout)
    server = app.listen(args.port, "127.0.0.1", backlog=4096)
    port = next(iter(server._sockets.values())).getsockname()[1]
    print(f"serving on http://127.0.0.1:{port}/", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
