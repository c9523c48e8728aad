"""The checks every route shares: what a request must be before a route acts on it.

A refusal is fail(): a JSON error (a short page for a browser) that changes
nothing. Here are the Host check against DNS rebinding, the client's address
as the limits count it, the cap on parked polls (Parking), the token buckets
of flood control, the reading of a body, a JSON object, a text field and a
cursor, and json_bytes(), the JSON of every answer. Each is handed the
settings it reads; this module uses Bottle, the front door and metrics,
nothing of the app."""

import collections
import functools
import ipaddress
import json
import math
import re
import time
import unicodedata
import urllib.parse

import bottle

import metrics
from frontdoor import MAX_BODY_BYTES, SAFE_HEADERS, SlowRequest, address_key

MAX_NICK_CHARS = 32             # in a chat message, and in who is here
# Bidirectional-text controls: in a nick they could reverse what follows it and
# impersonate someone; the pages isolate each text, but a nick may not have them.
BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def fail(status, message, **headers):
    """Stop the request with a JSON error; nothing has been changed. With
    Connection="close", the connection ends with this answer."""
    if headers.pop("Connection", None) == "close":
        # eventlet heeds its own flag, not an app's header: set, it says
        # Connection: close itself, and reads neither the rest of a body nor another request.
        bottle.request.environ["longpoll.connection"].close_after_answer()
    raise bottle.HTTPError(status, message, **headers)


def error_body(err):
    # A browser that asked for a page gets a short page; everyone else JSON.
    # Never a traceback: err.traceback stays on the server's stderr.
    message = err.body if err.status_code != 500 else "internal server error"
    # Its traceback holds the frame that holds the error: a cycle per refused
    # request, otherwise freed only by a full garbage collection.
    err.__traceback__ = None
    metrics.error(err.status_code)
    no_store()      # an error is about this request only: a cache must not replay it
    if "text/html" in bottle.request.get_header("Accept", ""):
        bottle.response.content_type = "text/html; charset=utf-8"
        status, message = bottle.html_escape(err.status), bottle.html_escape(message)
        return f"<!doctype html><title>{status}</title><h1>{status}</h1><p>{message}</p><a href='/'>Chat</a>"
    bottle.response.content_type = "application/json"
    return json.dumps({"error": message})


def no_store():
    bottle.response.set_header("Cache-Control", "no-store")
    bottle.response.set_header("X-Accel-Buffering", "no")   # a proxy must pass each answer on at once


def request_begins(settings):
    """Before every route: the checks every request passes (set as a hook by longpoll.py)."""
    environ = bottle.request.environ    # read once: each bottle.request.x is a green-thread-local lookup
    # A request without a body has been read whole: --client-timeout is over
    # for it (a parked poll is not a slow request). read_body() ends it for the others.
    if int(environ.get("CONTENT_LENGTH") or 0) == 0:
        environ["longpoll.connection"].request_read()
    elif environ["REQUEST_METHOD"] in ("GET", "HEAD"):
        # A body means nothing on a GET, yet while unread the request is not
        # over: read and dropped now, so that a poll does not park with its deadline on.
        read_body(settings, MAX_BODY_BYTES)
    # DNS rebinding: a page of evil.example whose name then resolves to 127.0.0.1
    # is, to the browser, same-origin with a server listening on loopback. Its
    # requests still name evil.example in Host, which a loopback server refuses.
    host = host_name(environ.get("HTTP_HOST", "localhost"))
    if settings.loopback_only and not (host in settings.allow_host or is_loopback(host)):
        fail(400, f"this server answers only for localhost; start it with --allow-host {host} to serve that name")


@functools.lru_cache(maxsize=256)       # a few names, asked on every request
def host_name(host_header):
    if "@" in host_header:
        return ""       # userinfo is no part of a Host: "evil@localhost" names no loopback host
    try:
        return urllib.parse.urlsplit("//" + host_header).hostname or ""
    except ValueError:
        return ""       # one urlsplit cannot read ("[::1" unclosed) names nothing: a 400, not a 500


def safe_headers():
    for name, value in SAFE_HEADERS:
        bottle.response.set_header(name, value)


def is_loopback(host):
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_cursor(name="cursor"):
    text = bottle.request.query.get(name)
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,18}", text):
        fail(400, f"{name} must be a non-negative integer")
    return int(text)


class Parking:
    """The polls parked now, counted per client address, and the places they may take."""

    def __init__(self):
        self.by_address = collections.Counter()     # client address -> polls it has parked now
        self.total = 0                              # polls parked now, from every address
        self.places = math.inf      # polls that may park at once, below eventlet's pool (main() sets it)

    def parked(self, settings):
        """Count a poll parked from the client's address while it waits: `with parking.parked(settings):`."""
        # One address may not hold every connection (and the memory they cost).
        address = client_address(settings)
        if self.by_address[address] >= settings.polls_per_address:
            fail(429, "too many polls from your address; try again later", Retry_After="5")
        if self.total >= self.places:
            # Polls may not take the pool's last places: with every one parked,
            # eventlet accepts nobody, and the post that would answer them cannot get in.
            # Closed: its place back to the pool, not held idle.
            fail(503, "the server is full; try again later", Retry_After="5", Connection="close")
        return Parked(self, address)


class Parked:
    """One poll counted as parked from its address, until its `with` block ends.
    A class, not a contextlib generator: every parked poll keeps it while it waits
    (with the protocol made by two calls, frontdoor.protocol(): 21.7 against 20.5 KB a client)."""

    __slots__ = ("parking", "address")

    def __init__(self, parking, address):
        self.parking, self.address = parking, address

    def __enter__(self):
        self.parking.by_address[self.address] += 1
        self.parking.total += 1

    def __exit__(self, *exc):
        by_address = self.parking.by_address
        self.parking.total -= 1
        by_address[self.address] -= 1
        if not by_address[self.address]:
            del by_address[self.address]        # else the table keeps every address ever seen


def from_trusted_proxy(settings):
    return bottle.request.environ.get("REMOTE_ADDR", "") in settings.trusted_proxy


def client_address(settings):
    """The client's address as limits count it: a trusted proxy's X-Forwarded-For is
    believed, nobody else's."""
    environ = bottle.request.environ
    addr = environ.get("REMOTE_ADDR", "")
    if addr not in settings.trusted_proxy:
        # Worked out once for the connection (Protocol.handle()): with more
        # clients than address_key() caches, it would be made afresh on every request.
        return environ["longpoll.connection"].address
    hops = [h.strip() for h in environ.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    # The rightmost hop no trusted proxy added.
    addr = next((h for h in reversed(hops) if h and h not in settings.trusted_proxy), addr)
    return address_key(addr)


def same_origin(origin, settings):
    """Whether a browser's Origin is the site it is on: the Host it asked for, or,
    behind a trusted proxy, the X-Forwarded-Host and -Proto that proxy saw."""
    req = bottle.request
    host, scheme = req.get_header("Host", ""), None
    if from_trusted_proxy(settings):
        host = req.get_header("X-Forwarded-Host", host).split(",")[0].strip()
        scheme = req.get_header("X-Forwarded-Proto", "").split(",")[0].strip().lower() or None
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:
        return False    # an Origin urlsplit cannot read ("http://[::1") is no site's: a 403, not a 500
    default_port = {"http": ":80", "https": ":443"}.get(parts.scheme, "")
    # Browsers leave a default port out of Origin; some clients put it in Host.
    return (parts.netloc.lower().removesuffix(default_port) == host.lower().removesuffix(default_port)
            and scheme in (None, parts.scheme))


def json_body(settings):
    """The request's JSON object, or a 4xx that says what was wrong with it."""
    req = bottle.request
    origin = req.get_header("Origin")
    if origin is not None and not same_origin(origin, settings):
        fail(403, "cross-origin requests are not accepted")
    if req.content_type.split(";")[0].strip().lower() != "application/json":
        fail(415, "Content-Type must be application/json")
    try:
        data = json.loads(read_body(settings, MAX_BODY_BYTES))
    except (ValueError, RecursionError):
        fail(400, "request body is not valid JSON")
    if not isinstance(data, dict):
        fail(400, "request body must be a JSON object")
    return data


def read_body(settings, limit):
    """The request's body, of at most limit bytes, or a 4xx."""
    req = bottle.request
    body = req.environ["wsgi.input"]
    try:
        if req.content_length > limit:
            # A client sends its whole body before it reads the answer (a hub
            # does): closed on, it hears a reset, not its 413. So the body is
            # read and dropped, as nginx's lingering close does, within the
            # request's deadline (the front door cut those too big even for that).
            while body.read(64 * 1024):
                pass
            fail(413, f"request body is over {limit // 1024} KB")
        # The front door refused chunked bodies, so Content-Length is exact.
        raw = body.read(max(0, req.content_length))
    except SlowRequest:
        fail(408, f"the request body took longer than {settings.client_timeout:g} s", Connection="close")
    req.environ["longpoll.connection"].request_read()
    return raw


def text_field(data, name, limit, allowed="", required=False, refused=()):
    value = data.get(name, "")
    if not isinstance(value, str):
        fail(400, f"{name} must be a string")
    value = value.strip()
    if required and not value:
        fail(400, f"{name} must not be empty")
    if len(value) > limit:
        fail(400, f"{name} is longer than {limit} characters")
    if any(unicodedata.category(c) in ("Cc", "Cs") and c not in allowed for c in value):
        fail(400, f"{name} contains control characters")
    if any(c in refused for c in value):
        fail(400, f"{name} contains bidirectional-text controls")
    return value


def too_many(wait, what):
    """A 429 for a client past its allowance: wait is what its bucket's take() said."""
    if wait:
        wait = math.ceil(wait)
        fail(429, f"too many {what}; try again in {wait} s", Retry_After=str(wait))


class TokenBucket:
    """An allowance per client address: `burst` at once, refilled at `rate` a second."""

    def __init__(self):
        self.buckets = collections.OrderedDict()    # address -> (tokens, time), oldest use first

    def take(self, key, rate, burst):
        """Take a token; return 0 if there was one, else seconds until there is."""
        now = time.monotonic()
        # Forget buckets untouched long enough to be full again. They sit at the
        # front, so this costs O(1) a post however many addresses post at once.
        while self.buckets and now - next(iter(self.buckets.values()))[1] >= burst / rate:
            self.buckets.popitem(last=False)
        tokens, then = self.buckets.get(key, (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if tokens < 1:
            return (1 - tokens) / rate
        self.buckets[key] = (tokens - 1, now)
        self.buckets.move_to_end(key)
        return 0


def json_bytes(value):
    # UTF-8, not \u escapes: an emoji is 4 bytes, not 12. A lone surrogate (a
    # post may not have one; a feed might) cannot be UTF-8, and becomes "?".
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")
