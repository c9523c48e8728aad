"""The front door: eventlet's HTTP server, hardened against hostile clients.

Every connection passes here before any route: a deadline for each whole
request (--client-timeout), a cap on connections per address, strict framing
(httptools, Node's parser), an environ of what the app reads, and answers
written straight to the socket.
Importing it also makes Bottle's request and response, and eventlet.wsgi's one
flag, local to each green thread. It uses eventlet, Bottle and httptools, and
feedtext for the largest body it lets in (a WebSub push); nothing of the app."""

import collections
import contextvars
import fcntl
import functools
import ipaddress
import json
import re
import resource
import socket
import struct
import sys
import termios
import urllib.parse

import bottle
import eventlet
import eventlet.wsgi
import httptools

import feedtext

MAX_BODY_BYTES = 64 * 1024      # a POST larger than this is refused with 413
DISCARD_FACTOR = 4              # a body over its limit is read and dropped up to this many times it; more is cut unread
MAX_HEADERS = 100               # header lines in a request, at most (as http.server)


def green_local(name):
    """A property whose value is the current green thread's own."""
    # Every greenlet has a contextvars context of its own: read in C. (eventlet's
    # patched threading.local goes through a weak-key dictionary: about 1 us a
    # read, dozens a request, and a dictionary per local kept by each parked poll.)
    var = contextvars.ContextVar(name)
    return property(lambda _: var.get(), lambda _, value: var.set(value))


# Bottle keeps the request and response being handled in threading.locals, and
# eventlet.wsgi one flag. All green threads share one OS thread: were these per
# OS thread, a woken poll would answer with whichever request arrived last.
bottle.LocalRequest.environ = green_local("bottle.request.environ")
for _name in ("_status_line", "_status_code", "_cookies", "_headers", "body"):
    setattr(bottle.LocalResponse, _name, green_local(f"bottle.response.{_name}"))


class WsgiLocal:
    already_handled = green_local("eventlet.wsgi.already_handled")


eventlet.wsgi.WSGI_LOCAL = WsgiLocal()


# On every answer: nothing is sniffed into another type, and pages this app
# links to are not told which of its pages (or polls) a reader was on.
SAFE_HEADERS = [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin")]


@functools.lru_cache(maxsize=4096)     # ipaddress objects are costly to make on every request
def address_key(addr):
    """An address as limits count it: an IPv6 client is its /64, since one host owns all of it."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if ip.version == 6:
        return str(ip.ipv4_mapped or ipaddress.ip_network((ip, 64), strict=False))
    return str(ip)


class SlowRequest(Exception):
    """A client took longer than --client-timeout to send its request."""


def abort(sock):
    """Make the coming close a reset (SO_LINGER on, 0 s): a plain close would
    leave the kernel holding the unread answer in FIN_WAIT1 for minutes."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def unsent(sock):
    """Bytes of what was written to sock that its client has not taken yet."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


class SocketWriter:
    """A connection's wfile that sends what it is given at once. eventlet writes
    each answer whole (writelines()), so a buffer kept for the connection's
    life only costs every parked client (measured at 10,000: 1.5 KB a client,
    and 7 % of the CPU an answer takes)."""

    closed = False

    def __init__(self, sock):
        self.sock = sock

    def write(self, data):
        try:
            self.sock.sendall(data)     # within the socket timeout: an answer never read does not hold the connection
        except (TimeoutError, SlowRequest):
            abort(self.sock)
            raise
        return len(data)

    def writelines(self, lines):
        self.write(b"".join(lines))

    def flush(self):
        pass                        # nothing is held back

    def close(self):
        self.closed = True          # the socket is eventlet's to close, in finish()


class Headers(dict):
    """A request's headers, read by llhttp: lower-case name -> its values. get()
    and get_all() are http.client.HTTPMessage's, which eventlet reads, without
    the email package beneath it (a browser's eight headers: 4.7 against 8.8 us)."""

    def get(self, name, default=None):
        values = super().get(name.lower())
        return values[0] if values else default

    def get_all(self, name):
        return super().get(name.lower(), [])


class Protocol(eventlet.wsgi.HttpProtocol):
    """eventlet's HTTP/1.1 server with what a server facing hostile clients needs
    more: a deadline for each whole request, a cap on connections per address,
    and strict framing. Served as protocol(settings, pause), which hands it the
    flags and how to yield between requests."""

    settings = None
    pause = None
    answered_at = 0.0       # when a poll on this connection was last answered (the app's wakeup.pace())

    # Each connection keeps its read buffer for its whole life (eventlet's
    # default is 8 KB); requests here are small, and a small buffer holds more
    # parked clients (measured at 10,000, with the write buffer alike: 33 -> 27 KB a client).
    rbufsize = 1024
    open_by_address = collections.Counter()     # peer address -> connections it holds open now

    def setup(self):
        # eventlet's setup(), less its SSL cases and its write buffer (SocketWriter).
        conn = self.connection = self.request
        # An answer longer than a segment goes out in several: without
        # TCP_NODELAY the last, short one could wait for the client's delayed ACK.
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rfile = conn.makefile("rb", self.rbufsize)
        self.wfile = SocketWriter(conn)

    def handle(self):
        # Whatever its connections do (a slow request, an idle keep-alive, an
        # answer never read), one address may not hold them all. A trusted
        # proxy carries everyone's; its clients are limited by X-Forwarded-For.
        self.address = address = address_key(self.client_address[0])
        counted = address not in self.settings.trusted_proxy
        if counted:
            if self.open_by_address[address] >= self.settings.connections_per_address:
                return                              # finish() closes it, unread
            self.open_by_address[address] += 1
        try:
            super().handle()
        finally:
            if counted:
                self.open_by_address[address] -= 1
                if not self.open_by_address[address]:
                    del self.open_by_address[address]

    def handle_one_request(self):
        # Yield first (wakeup.pause(), as serve() was handed it): in a fan-out,
        # every woken poll writes its answer before any of them sets about
        # reading its next request (at 10,000 clients, measured 76-82 against
        # 82-99 us of server CPU per answer, 1 KB less memory per parked client).
        self.pause()
        # eventlet's socket timeout is per read, so a byte every few seconds
        # holds a connection for ever. This deadline is for the whole request,
        # from the wait for its first byte (an idle keep-alive too) to the end
        # of its body; the app ends it once the request is read (checks.request_begins()).
        self.deadline = eventlet.Timeout(self.settings.client_timeout, SlowRequest)  # made only if raised
        try:
            super().handle_one_request()
        except SlowRequest:
            self.close_connection = 1
            if unsent(self.connection):     # it stopped reading its answers: gone, not held in FIN_WAIT1
                abort(self.connection)
        finally:
            self.deadline.cancel()
            # The environ is in cycles (with Bottle's request, and this protocol
            # it holds): emptied, each request is freed by reference counting,
            # not left to a full garbage collection over every parked client.
            vars(self).pop("environ", {}).clear()

    def _read_request_line(self):
        # A request line ended by a CR alone would be waited on, for an LF that
        # never comes, until the deadline: what has arrived is looked at first.
        try:
            ahead = self.rfile.peek()       # the read that readline() would make first anyway
        except (OSError, ValueError):
            return b""                      # gone, silent past the socket timeout, or closed
        cr = ahead.find(b"\r")
        if 0 <= cr < len(ahead) - 1 and ahead[cr + 1] != ord("\n"):
            self.send_error(400, "malformed request: a line ends with CR alone, not CRLF")
            return b""
        line = super()._read_request_line()
        if len(line) >= self.server.url_length_limit:     # eventlet would answer it, in plain text
            self.send_error(414, f"the request line is over {self.server.url_length_limit // 1024} KB")
            return b""
        return line

    def get_environ(self):
        # eventlet's, less what every request paid for and nothing here reads:
        # a getsockname() call, two exceptions raised and caught, a raw copy of
        # the headers, a WebSocket hook. With Headers, measured in turns:
        # 210 against 189 us of server CPU a poll answered at once; at 10,000
        # parked, 21.2 against 20.6 KB a client (bench.py; docs/performance.md).
        path, _, query = self.path.partition("?")
        environ = {
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
            "REQUEST_METHOD": self.command, "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, encoding="latin1"), "QUERY_STRING": query,
            "SERVER_PROTOCOL": self.request_version, "REMOTE_ADDR": self.client_address[0],
            "SERVER_NAME": self.server.address[0], "SERVER_PORT": str(self.server.address[1]),
            "eventlet.posthooks": (),       # nothing here adds one: one list less a parked poll keeps
            "longpoll.connection": self,    # for checks.py: address, request_read(), close_after_answer()
        }
        for name, values in self.headers.items():
            if "_" in name:
                continue        # as eventlet: an X_Forwarded_For must not pass for X-Forwarded-For
            key = name.upper().replace("-", "_")
            if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                environ[key] = values[0]        # as eventlet: the first (parse_request() refused a second Content-Length)
            else:
                environ["HTTP_" + key] = ",".join(values)
        continues = environ.get("HTTP_EXPECT", "").lower() == "100-continue"
        environ["wsgi.input"] = environ["eventlet.input"] = eventlet.wsgi.Input(
            self.rfile, environ.get("CONTENT_LENGTH", "0"), self.connection,
            wfile=self.wfile if continues else None, wfile_line=b"HTTP/1.1 100 Continue\r\n" if continues else None)
        return environ

    def request_read(self):
        """The request is read whole (checks.py says when): its deadline is over."""
        self.deadline.cancel()

    def close_after_answer(self):
        """For checks.fail(..., Connection="close")."""
        self.close_connection = 1

    def parse_request(self):
        # http.server parses each request's headers with the email package's
        # feed parser, most of the CPU a parked poll costs (47 against 9 us a
        # request, measured). llhttp (httptools, Node's parser) is also strict
        # where that one is lenient: folded lines, a space before the colon,
        # two Content-Lengths, bare LF line ends are all refused.
        self.command, self.request_version = None, "HTTP/1.0"    # what send_error() may read
        self.close_connection = True                            # unless the request says otherwise
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if not self.requestline.strip():
            return False
        if " HTTP/" not in self.requestline:
            # HTTP/0.9 ("GET /path"): no headers follow, so none are waited for.
            self.send_error(505, "HTTP/0.9 is not supported: send HTTP/1.1")
            return False
        head = [self.raw_requestline]
        while head[-1] not in (b"\r\n", b"\n"):
            if not head[-1]:
                return False                                    # closed before its headers ended
            if len(head) > MAX_HEADERS:
                self.send_error(431, "too many header lines")
                return False
            try:
                head.append(self.rfile.readline(65537))     # eventlet's reader bounds each line, and all of them
            except eventlet.wsgi.HeaderLineTooLong:         # which eventlet would answer in plain text
                self.send_error(400, f"a header line is over {eventlet.wsgi.MAX_HEADER_LINE // 1024} KB")
                return False
            except eventlet.wsgi.HeadersTooLarge:
                self.send_error(400, f"the request's headers are over {eventlet.wsgi.MAX_TOTAL_HEADER_SIZE // 1024} KB")
                return False
        self.url, self.headers = b"", Headers()
        parser = httptools.HttpRequestParser(self)      # calls on_url() and on_header() below
        # Transfer-Encoding beside Content-Length is let through, to be refused
        # below with every Transfer-Encoding: a 411 that says to send Content-Length.
        parser.set_dangerous_leniencies(lenient_chunked_length=True)
        try:
            parser.feed_data(b"".join(head))
        except httptools.HttpParserUpgrade:
            pass                    # an Upgrade this server does not do: answered as HTTP/1.1
        except httptools.HttpParserError as e:
            self.send_error(400, f"malformed request: {e}")
            return False
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self.send_error(505, f"HTTP/{version} is not supported: send HTTP/1.1")
            return False
        self.command, self.request_version = parser.get_method().decode("ascii"), f"HTTP/{version}"
        self.path = self.url.decode("iso-8859-1")
        # Not parser.should_keep_alive(): llhttp forgets the Connection header once a bodiless request is complete.
        connection = {token.strip() for token in self.headers.get("Connection", "").lower().split(",")}
        self.close_connection = "close" in connection or (version == "1.0" and "keep-alive" not in connection)
        # The access log shows the request line: never with a browser's presence id in it.
        if "browser=" in self.requestline:     # a regular expression only for the polls that carry one
            self.requestline = re.sub(r"([?&]browser=)[^&\s]*", r"\1-", self.requestline)
        # Where two readers of a request could disagree on where its body ends
        # (a proxy in front, and this server), a request could hide another in
        # its body: refuse what nginx refuses, before reading any of it.
        lengths = self.headers.get_all("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None:
            if self.path.startswith("/websub/"):
                # Some hubs copy the topic's own Transfer-Encoding into the push: theirs to mend.
                print("longpoll: refused a WebSub push sent with Transfer-Encoding (411); the hub will retry it, "
                      "in vain until it sends Content-Length alone", file=sys.stderr, flush=True)
            self.send_error(411, "chunked request bodies are not accepted: send Content-Length")
        elif len(lengths) > 1 or not all(re.fullmatch(r"[0-9]{1,18}", n) for n in lengths):
            self.send_error(400, "Content-Length must be given once, as a number of bytes")
        elif lengths and int(lengths[0]) > DISCARD_FACTOR * (
                feedtext.MAX_FEED_BYTES if self.path.startswith("/websub/") else MAX_BODY_BYTES):
            # Too big even to read and drop for its 413 (checks.read_body()): refused, and cut unread.
            self.send_error(413, "request body is far over the limit")
        else:
            return True
        return False

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        # llhttp keeps the spaces and tabs that may end a value: "localhost " is localhost.
        self.headers.setdefault(name.decode("iso-8859-1").lower(), []).append(value.decode("iso-8859-1").rstrip(" \t"))

    def send_error(self, code, message=None, explain=None):
        # Every refusal before the app is JSON too, and ends the connection:
        # what follows on it may be a body that was never read.
        body = json.dumps({"error": message or self.responses[code][0]}).encode()
        self.wfile.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n%s\r\n%s" % (
                             code, self.responses[code][0].encode(), len(body),
                             b"".join(b"%s: %s\r\n" % (n.encode(), v.encode()) for n, v in SAFE_HEADERS), body))
        self.close_connection = 1


def protocol(settings, pause):
    """What eventlet.wsgi.server() calls for each connection: a Protocol with these
    flags, calling pause() before reading each request."""
    cls = type("Protocol", (Protocol,), {"settings": settings, "pause": staticmethod(pause)})

    def connection(conn_state, server):
        # Made and run by two Python calls, not cls(...): eventlet's protocol
        # serves the whole connection inside __init__, and a call through the
        # class is C frames that every parked poll's saved stack would keep
        # (measured: 21.7 against 20.9 KB a parked client).
        handler = cls.__new__(cls)
        handler.__init__(conn_state, server)
    return connection


def open_files_limit():
    """Raise the soft open-files limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError):
        return soft


def pool_size(reserve):
    """How many connections eventlet may hold: below the open-files limit by reserve."""
    # eventlet serves at most 1024 connections by default, idle keep-alives
    # included, and its accept loop dies if it runs out of descriptors: size the
    # pool from the open-files limit, below it.
    max_clients = open_files_limit() - reserve
    if max_clients < 10000:
        print(f"longpoll: the open-files limit allows only {max_clients} clients", file=sys.stderr)
    return max_clients


def serve(sock, wsgi_app, settings, max_clients, pause):
    """Serve wsgi_app on the listening sock through this front door, in a green
    thread; each connection calls pause() before reading its next request."""
    return eventlet.spawn(
        eventlet.wsgi.server, sock, wsgi_app, max_size=max_clients, protocol=protocol(settings, pause),
        log_output=settings.access_log, debug=False, capitalize_response_headers=False,
        # Never socket.setdefaulttimeout(): it would apply to the listening
        # socket too. These drop a client that is slow to send its request.
        socket_timeout=settings.client_timeout, keepalive=settings.client_timeout)
