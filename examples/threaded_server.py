"""The chat's long-poll contract with one OS thread per connection (the standard
library's ThreadingHTTPServer), for bench.py --compare.

    python examples/threaded_server.py [--port 0]
"""
import argparse
import collections
import http.server
import json
import threading
import time
import urllib.parse


class Stream:
    """The same Stream with a Condition: threads are preempted anywhere, so the
    look and the wait must happen under one lock, or a publish between them is lost."""

    def __init__(self, history=200):
        self.items, self.last_id, self.waiting = collections.deque(maxlen=history), 0, 0
        self.changed = threading.Condition()

    def publish(self, **fields):
        with self.changed:
            self.last_id += 1
            self.items.append({"id": self.last_id, **fields})
            self.changed.notify_all()
            return self.items[-1]

    def since(self, cursor):
        if cursor is None or cursor > self.last_id:
            return list(self.items), self.last_id, False
        first = self.last_id - len(self.items) + 1
        return [i for i in self.items if i["id"] > cursor], self.last_id, cursor < first - 1

    def wait(self, cursor, timeout):
        with self.changed:
            items, last, gap = self.since(cursor)
            if not items and not gap and last == cursor:
                self.waiting += 1
                self.changed.wait(timeout)      # releases the lock while it sleeps
                self.waiting -= 1
                items, last, gap = self.since(cursor)
            return items, last, gap


chat = Stream()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/status":
            waiting = chat.waiting
            return self.answer(200, {"waiting": waiting,
                                     "streams": {"chat": {"last_id": chat.last_id, "waiting": waiting}}})
        text = urllib.parse.parse_qs(url.query).get("cursor", [None])[0]
        if text is not None and not text.isdecimal():
            return self.answer(400, {"error": "cursor must be a non-negative integer"})
        items, cursor, gap = chat.wait(None if text is None else int(text), self.server.poll_timeout)
        self.answer(200, {"messages": items, "cursor": cursor, **({"gap": True} if gap else {})})

    def do_POST(self):
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.answer(201, chat.publish(nick=data.get("nick", "anonymous"), body=data["body"], time=time.time()))

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    flags = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    flags.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    flags.add_argument("--poll-timeout", type=float, default=25, help="seconds a poll waits (default: 25)")
    args = flags.parse_args()
    http.server.ThreadingHTTPServer.request_queue_size = 4096
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads, server.poll_timeout = True, args.poll_timeout
    print(f"serving on http://127.0.0.1:{server.server_address[1]}/", flush=True)
    server.serve_forever()
