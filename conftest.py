"""What both test files share: the server under test, started as its own process,
and a local feed server with fixture feeds. Standard library only: test_browser.py
runs Playwright, which must not share a process with eventlet's monkey-patching."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest

HERE = Path(__file__).resolve().parent


class Response:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


class Server:
    """longpoll.py started as its own process on a free port (run by a `prefix`
    command, such as prlimit, if given)."""

    def __init__(self, *flags, prefix=()):
        if not any(f.startswith("--feed") for f in flags):
            flags += ("--feeds", os.devnull)     # no feeds: nothing leaves the machine
        if "--db" not in flags:
            flags += ("--db", ":memory:")       # no file left in the repository
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "longpoll.py", "--port", "0", *flags], cwd=HERE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.banner = self.proc.stdout.readline()
        match = re.search(r"http://([\d.]+):(\d+)/", self.banner)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {self.banner}{self.proc.stderr.read()}")
        self.host, self.port = match[1], int(match[2])

    def request(self, method, path, body=None, headers=None, timeout=15, source=None):
        """One request; `source` is a loopback address to send it from (127.x.y.z)."""
        headers = dict(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout,
                                          source_address=(source, 0) if source else None)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Response(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, message, **kw):
        return self.request("POST", "/chat/messages", body=message, **kw)

    def status(self):
        return self.get("/status").json()

    def cursor(self, stream="chat"):
        """The cursor that makes a poll of this stream wait for the next item."""
        return self.status()["streams"][stream]["last_id"]

    def wait_for(self, predicate, timeout=10):
        """Poll /status until predicate(status) holds; return that status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, f"never true; last status: {status}"
            time.sleep(0.05)

    def stop(self):
        """SIGTERM, then the server's stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=15)
        return err


def loopback(n):
    """The n-th loopback address past 127.0.1.0: thousands of clients come from many
    addresses, and the server caps the polls one address may park."""
    n += 256
    return f"127.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


@pytest.fixture
def start():
    started = []

    def start_server(*flags, **kw):
        started.append(Server(*flags, **kw))
        return started[-1]
    yield start_server
    for srv in started:
        err = srv.stop()
        # Captured, so shown only with a failing test: what its servers wrote to stderr, a traceback included.
        print(f"--- the server on port {srv.port}, exit status {srv.proc.returncode}, its stderr ---\n{err[-5000:]}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """Debian's redis-server on a free loopback port, writing only to `folder`:
    nothing at all, or with `persist` an append-only file synced at every write."""

    def __init__(self, folder, persist=False, port=None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder),
                     "--save", "", "--appendonly", "yes" if persist else "no", "--appendfsync", "always"]
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while self.cli("PING") != "PONG":       # a process to wait for, not an event
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def cli(self, *args):
        return subprocess.run(["redis-cli", "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=10).stdout.strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not shutil.which("redis-server"):
        if os.environ.get("CI") == "true":     # locally a skip; in CI never a silent pass
            pytest.fail("redis-server is not installed; .ci/run installs it")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    yield srv
    srv.stop()


@pytest.fixture
def redis_url(redis_server):
    """The shared test Redis, emptied for this test."""
    redis_server.cli("FLUSHALL")
    return redis_server.url


def atom(entries, title="Fixture Atom"):
    """An Atom document; entries are (id, title, link, summary) tuples, newest first (and dated so)."""
    body = "".join(
        f"<entry><id>{escape(i)}</id><title type='html'>{escape(t)}</title>"
        f"<link href={quoteattr(link)}/><updated>2026-11-{28 - n % 28:02d}T10:00:00Z</updated>"
        f"<summary type='html'>{escape(s)}</summary></entry>"
        for n, (i, t, link, s) in enumerate(entries))
    return (f"<?xml version='1.0' encoding='utf-8'?><feed xmlns='http://www.w3.org/2005/Atom'>"
            f"<title>{escape(title)}</title><id>urn:fixture</id>"
            f"<updated>2026-11-28T10:00:00Z</updated>{body}</feed>").encode()


def hubbed(entries, hub=None, self_url=None, title="Fixture Atom"):
    """An Atom document of entries that names a WebSub hub and its self URL."""
    links = (f"<link rel='hub' href={quoteattr(hub)}/>" if hub else "") + (
        f"<link rel='self' href={quoteattr(self_url)}/>" if self_url else "")
    return atom(entries, title).replace(b"<id>urn:fixture</id>", b"<id>urn:fixture</id>" + links.encode())


def rss(items, title="Fixture RSS"):
    body = "".join(
        f"<item><guid>{escape(i)}</guid><title>{escape(t)}</title><link>{escape(link)}</link>"
        f"<description>{escape(s)}</description><pubDate>Tue, 03 Nov 2026 09:30:00 GMT</pubDate></item>"
        for i, t, link, s in items)
    return (f"<?xml version='1.0' encoding='utf-8'?><rss version='2.0'><channel>"
            f"<title>{escape(title)}</title><link>http://example.com/</link>{body}</channel></rss>").encode()


def numbered(first, last):
    """Entries first..last as (id, title, link, summary), newest first, as feeds list them."""
    return [(f"urn:e{n}", f"Entry {n}", f"http://example.com/{n}", f"Summary {n}")
            for n in range(last, first - 1, -1)]


def serve(handler):
    """A threaded HTTP server of the handler on a free loopback port, serving in the background."""
    import http.server  # here, not above: after test_longpoll's import of longpoll patched select
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    return httpd


class FeedServer:
    """Fixture feeds on a free loopback port; each path maps to a handler."""

    def __init__(self):
        import http.server  # here, not above: after test_longpoll's import of longpoll patched select
        self.routes, self.requests, self.times = {}, [], []
        self.release = threading.Event()        # set at close to end hung answers
        feeds = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                feeds.requests.append(self.headers)
                feeds.times.append(time.monotonic())
                handler = feeds.routes.get(self.path, lambda: (404, [], b""))
                status, headers, body = handler()
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                if isinstance(body, bytes):
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:                           # an iterable of chunks, sent as they come
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for chunk in body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = serve(Handler)
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def feed(self, path, body, etag=None, content_type="application/xml", headers=()):
        def handler():
            if etag and self.requests[-1].get("If-None-Match") == etag:
                return 304, [("ETag", etag)], b""
            extra = [("ETag", etag)] if etag else []
            return 200, [("Content-Type", content_type), *extra, *headers], body
        self.routes[path] = handler
        return self.url + path

    def status(self, path, status, headers=()):
        self.routes[path] = lambda: (status, list(headers), b"nope")
        return self.url + path

    def hang(self, path):
        def handler():
            self.release.wait()
            return 200, [], b""
        self.routes[path] = handler
        return self.url + path

    def drip(self, path, body):
        def dripping():
            for byte in body:
                if self.release.wait(0.1):
                    return
                yield bytes([byte])
        self.routes[path] = lambda: (200, [("Content-Type", "application/xml")], dripping())
        return self.url + path

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class Hub:
    """A WebSub hub on a free loopback port, as the spec and real hubs behave:
    it takes a subscription form, answers 202, then verifies the callback with a
    GET (or denies it), and pushes signed bodies on request. `answer` refuses
    subscriptions with another status; `lease` is the lease it grants; a hub that
    never `verifies` accepts and stays silent, as a failed verification does."""

    def __init__(self, lease=864000, answer=202, verifies=True):
        import http.server
        import urllib.parse
        self.lease, self.answer, self.verifies = lease, answer, verifies
        self.deny = None                # a reason: deny the next subscriptions instead of verifying them
        self.requests = []              # (form, headers) of each subscription request
        self.verifications = []         # (status, whether the body was the challenge) of each verification
        self.subs = {}                  # topic -> the form of its latest verified subscription
        self.times, self.verified_at = [], []   # time.monotonic() of each request, and of each verification
        self.changed = threading.Condition()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                form = {k: v[0] for k, v in urllib.parse.parse_qs(body.decode()).items()}
                with hub.changed:
                    hub.requests.append((form, self.headers))
                    hub.times.append(time.monotonic())
                    hub.changed.notify_all()
                self.send_response(hub.answer)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"no")
                if hub.answer == 202 and hub.verifies:      # verified after the answer, as hubs do
                    threading.Thread(target=hub.verify, args=(form,), daemon=True).start()

            def log_message(self, *args):
                pass

        self.httpd = serve(Handler)
        self.url = "http://127.0.0.1:%d/" % self.httpd.server_address[1]

    def verify(self, form, challenge=None):
        """The verification GET for a subscription form: (status, body)."""
        import urllib.parse
        challenge = challenge or os.urandom(12).hex()
        if self.deny:
            query = {"hub.mode": "denied", "hub.topic": form["hub.topic"], "hub.reason": self.deny}
        else:
            query = {"hub.mode": form["hub.mode"], "hub.topic": form["hub.topic"], "hub.challenge": challenge,
                     "hub.lease_seconds": self.lease}
        status, body = self.call("GET", form["hub.callback"] + "?" + urllib.parse.urlencode(query))
        with self.changed:
            self.verifications.append((status, body == challenge.encode()))
            if status == 200 and body == challenge.encode():
                self.subs[form["hub.topic"]] = form
                self.verified_at.append(time.monotonic())
            self.changed.notify_all()
        return status, body

    def push(self, topic, body, method="sha256", signature=None, headers=(), callback=None, chunked=False):
        """POST body to the topic's subscriber, signed with its secret (or `signature`): the status.
        `chunked` sends it with Transfer-Encoding: chunked, as some hubs do."""
        import hashlib
        import hmac
        form = self.subs[topic]
        if signature is None:
            signature = f"{method}=" + hmac.new(form["hub.secret"].encode(), body, getattr(hashlib, method)).hexdigest()
        headers = {"Content-Type": "application/atom+xml", **({"X-Hub-Signature": signature} if signature else {}),
                   **dict(headers)}
        return self.call("POST", callback or form["hub.callback"], iter([body]) if chunked else body, headers)[0]

    def call(self, method, url, body=None, headers=None):
        import urllib.parse
        parts = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        try:
            conn.request(method, parts.path + ("?" + parts.query if parts.query else ""), body=body,
                         headers={"Host": "localhost", **(headers or {})}, encode_chunked=body is not None
                         and not isinstance(body, bytes))
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def wait(self, predicate, timeout=10):
        """Wait until predicate(self) holds, as the hub's records change."""
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self), timeout), (
                f"never true: {len(self.requests)} requests, verifications {self.verifications}")

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
