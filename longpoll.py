#!/usr/bin/env python3
"""longpoll: server push over plain HTTP long polling, with green threads.

A browser asks a stream for what is newer than its cursor. If nothing is, the request
simply waits -- an Event inside an ordinary Bottle handler -- until something is published.
Three streams share that mechanism: the chat room, the feed stream, and who is here.

How a posted message reaches a waiting browser is told once, in docs/walkthrough.md:
post_message(), Stream.publish() and its store, Stream.add(), Stream.wait(), stream_updates().

This file is the top of the house, read top to bottom: configuration, the
stream and the registry of streams, the polls, the chat, who is here, the feed
poller, push from WebSub hubs, status and pages, main(). main() builds each
part and hands it what it needs; no part imports this file:
  frontdoor.py  eventlet's HTTP server, hardened against hostile clients
  checks.py     the checks every route shares: errors, addresses, bodies, limits
  flags.py      the command line        wakeup.py    the Event, sent a slice at a time; pacing
  presence.py   who is here             websub.py    push from WebSub hubs
  feedtext.py   a feed fetched, made plain text          metrics.py   GET /metrics
  storage.py    the store contract; the store of one process (SQLite)
  sharing.py    the store of several processes (Redis)
"""

# eventlet says on import that it is in bugfix-only maintenance; the README
# says so too, so a normal start stays quiet.
import warnings
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")

import eventlet
# Before anything imports socket, threading or time: a module that keeps its
# own reference to a blocking call would stop every green thread while it waits.
eventlet.monkey_patch()

import collections
import functools
import gc
import itertools
import json
import os
import re
import signal
import sys
import time
import urllib.parse
from pathlib import Path

import bottle
import eventlet.hubs
import eventlet.tpool

import checks
import feedtext
import flags
import frontdoor
import metrics
import presence
import sharing
import storage
import wakeup
import websub


HERE = Path(__file__).resolve().parent

# -- Configuration ------------------------------------------------------------

MAX_ANSWER_BYTES = 256 * 1024   # of history in one answer; a client catching up asks again for the rest
MAX_PAGE = 200                  # messages in one page of the chat's past (GET /chat/messages), at most
PAST_RATE = 5.0                 # pages of the chat's past one address may ask a second, over time
PAST_BURST = 60                 # and at once: a page that fills a long gap asks dozens in a row
MAX_MESSAGE_CHARS = 2000
MAX_CLIENT_ID_CHARS = 64
FIRST_FETCH_ENTRIES = 5         # a feed's first fetch publishes only its newest few
MAX_NEW_PER_FETCH = 30          # a feed that renews every id at once is a bounded burst
SEEN_PER_FEED = 1000            # dedupe memory per feed, beyond the current fetch
FETCH_CONCURRENCY = 20          # fetches in flight at once, whatever the number of feeds
MAX_BACKOFF = 3600              # seconds between tries of a failing feed, at most
FD_RESERVE = 64 + 2 * FETCH_CONCURRENCY  # descriptors kept free of client connections

# What main() builds, once. Only this file reads them; each part is handed what it needs.
settings = None     # the command line (flags.parse_args())
store = None        # the store of the kept streams: the --db, or --redis
streams = {}        # name -> Stream (open_streams())
posting = None      # posts' flood control: a TokenBucket, or with --redis sharing.RedisBuckets for every process
here = None         # a presence.Presence: the browsers here
feeds = []          # a Feed for each --feed

# -- The stream ---------------------------------------------------------------


class Stream:
    """A bounded history of items with consecutive ids, and the clients waiting for the next.

    The pattern is add() and wait(). Its store gives the ids and keeps the items
    (storage.Store in one process, sharing.RedisStore for several, storage.Unkept
    for a stream not stored) and hands each batch back to add(). The store is
    asked one question after start: resolve(), about a cursor this process has
    not seen. The rest of the class is caches, so that the thousands of polls
    a publish wakes share one answer."""

    def __init__(self, key, store, history):
        self.key, self.store = key, store   # key: the list's name in a response, and in the store
        items, self.last_id = store.load(key)
        self.items = collections.deque(maxlen=history)
        self.event = wakeup.Wakeup()        # what waiters wait on; sent, and replaced, by each add()
        self.waiting = 0
        self.closed = False
        # Worked out once per publish for every poll (keep()): the JSON of each kept
        # item, and the rest until the next publish.
        self.encoded = collections.OrderedDict()    # id -> that item's JSON, encoded once for every answer
        self.answers = {}                           # answers given since the last publish, by what they hold
        self.pages = {}                             # since()'s results since the last publish, by cursor
        self.past = {}                              # answers of the chat's past since the last publish
        self.keep(items)

    def publish(self, *batch, **record):
        """Publish items (dicts of fields) with what the store keeps beside them (a chat
        message's client_id, a feed's state): (the items with their ids, whether they are new)."""
        return self.store.append(self.key, batch, **record)

    def add(self, items):
        """Keep items that are stored and have their ids, and wake every waiter."""
        if not items:
            return
        if items[0]["id"] != self.last_id + 1:
            # Ids this process never had (trimmed from Redis while it was cut
            # off, or a wiped Redis counting afresh): forget the kept items, so
            # that since() tells older cursors of the gap.
            self.items.clear()
            self.encoded.clear()
        self.last_id = items[-1]["id"]
        self.keep(items)
        metrics.published[self.key] += len(items)
        # A Wakeup is sent only once: swap in a fresh one, then send the old one,
        # which wakes every current waiter, a slice per turn of the hub.
        event, self.event = self.event, wakeup.Wakeup()
        event.send()

    def wait(self, cursor, timeout):
        """Like since(), but wait up to timeout seconds for an item if there is none yet."""
        deadline = time.monotonic() + timeout
        while True:
            # Take the Event before looking: a publish that lands between the look
            # and the wait has sent this very Event, so the wait returns at once
            # instead of missing the item (the lost wake-up). The look may yield
            # (resolve() asks Redis), and this order is what makes that safe.
            event = self.event
            items, cursor_out, gap = self.since(cursor)
            left = deadline - time.monotonic()
            if items or gap or cursor_out != cursor or self.closed or left <= 0:
                return items, cursor_out, gap
            self.waiting += 1
            try:
                # A client that went away is noticed only when this returns, so the
                # timeout bounds what an abandoned poll costs.
                event.wait(left)
            finally:
                self.waiting -= 1
            # Woken, look again: with Redis, ids below the cursor (not yet read here) wake it too.

    def since(self, cursor):
        """(items newer than cursor, cursor to send next, whether items were dropped).
        At most MAX_ANSWER_BYTES of them: then the cursor is the last one's, and
        the client's next poll gets the rest at once."""
        if cursor is not None and cursor > self.last_id:
            issued = self.resolve(cursor)
            if issued is not None:
                # Issued elsewhere and on its way: wait for what follows. Or the
                # store had lost it and gave a new id past it: told of the gap.
                return [], issued, issued != cursor
            if cursor > self.last_id:
                cursor = None   # never issued (nor delivered while the store was asked): start over
        # The thousands of polls a publish wakes ask with the same cursor: the
        # page is worked out once for all of them (they only read it).
        return remembered(self.pages, cursor, lambda: self.page(cursor))

    def resolve(self, cursor):
        """The store's question, for a cursor above every id this process has seen:
        the id to wait after if it was issued (by another process, or a new id the
        store gave past one it lost), None if it never was. With Redis, a round trip."""
        try:
            return self.store.issued(self.key, cursor)
        except storage.StoreError:
            # Redis cannot say while it is down: wait, as for an id issued elsewhere,
            # and ask again at the next look (a poll is never a 500 for it).
            return cursor

    def close(self):
        """Answer every parked poll now and any later one at once (for shutdown)."""
        self.closed = True
        event, self.event = self.event, wakeup.Wakeup()
        event.send()

    # -- The caches: each answer worked out once per publish, for every poll --

    def keep(self, items):
        self.items.extend(items)
        self.answers.clear()
        self.pages.clear()
        # A new dict, not clear(): an answer worked out from the store before
        # this publish is then kept in the old one, which nobody reads any more.
        self.past = {}
        for item in items:
            self.encoded[item["id"]] = checks.json_bytes(item)
        while len(self.encoded) > len(self.items):
            self.encoded.popitem(last=False)        # the JSON of items the deque let go

    def page(self, cursor):
        if cursor is None:
            # No cursor: start over from the newest kept items.
            newest = fitting(self.encoded[item["id"]] for item in reversed(self.items))
            return list(itertools.islice(self.items, len(self.items) - newest, None)), self.last_id, False
        first = self.last_id - len(self.items) + 1    # oldest id still kept
        gap = cursor < first - 1
        start = max(0, cursor - first + 1)
        fit = fitting(self.encoded[item["id"]] for item in itertools.islice(self.items, start, None))
        newer = list(itertools.islice(self.items, start, start + fit))
        return newer, newer[-1]["id"] if newer else self.last_id, gap

    def answer(self, items, cursor, gap):
        """since()'s result as the JSON of an answer, built once for every poll that
        gets the same: a thousand woken polls cost one encoding, and while they are
        written they share that one copy (eventlet sends a bytes object as it is)."""
        def encode():
            listed = b",".join(self.encoded.get(item["id"]) or checks.json_bytes(item) for item in items)
            return b'{"%s":[%s],"cursor":%d%s}' % (self.key.encode(), listed, cursor, b',"gap":true' if gap else b"")
        return remembered(self.answers, (items[0]["id"] if items else None, cursor, gap), encode)


def remembered(cache, key, work):
    """cache[key], worked out by work() the first time it is asked for. At 64
    entries the cache starts over: clients asking with every cursor there is cannot grow it."""
    if key not in cache:
        if len(cache) >= 64:
            cache.clear()
        cache[key] = work()
    return cache[key]


def fitting(encoded):
    """How many of these items' JSON, taken in order, fit in one answer (one at least)."""
    fit = size = 0
    for item_json in encoded:
        size += len(item_json) + 1
        if size > MAX_ANSWER_BYTES and fit:
            break
        fit += 1
    return fit


# Every stream: its name (its /NAME/updates and its row in /status), the key of its
# items, and whether the store keeps them. Creating, loading, delivering, following,
# closing, /status and the polls go through this list (presence polls /presence/updates).
STREAMS = {
    "chat": ("messages", "stored"),         # ids and items kept by the store (--db, or --redis)
    "feed": ("entries", "stored"),
    "presence": ("presence", "not stored"),  # snapshots: ids given by this process, nothing kept
}


def open_streams(store, history):
    """A Stream for each of STREAMS, from what the store kept, and the store's
    deliveries routed to them; then start the store's reader, if it has one.
    A stream not stored has a storage.Unkept of its own and keeps its newest item only."""
    opened = {name: Stream(key, store, history) if how == "stored" else Stream(key, storage.Unkept(), 1)
              for name, (key, how) in STREAMS.items()}
    by_key = {s.key: s for s in opened.values()}
    for s in opened.values():
        s.store.deliver = lambda key, items: by_key[key].add(items)
    store.start()
    return opened


app = bottle.Bottle()
app.merge(metrics.app)      # GET /metrics
app.default_error_handler = checks.error_body      # for every error status, ours and Bottle's
app.add_hook("before_request", lambda: checks.request_begins(settings))
app.add_hook("after_request", checks.safe_headers)
parking = checks.Parking()  # polls parked now, per address; main() sets how many may park

# -- The polls ----------------------------------------------------------------


def updates(stream, cursor):
    """A poll: parked (and counted) until the stream has news for cursor or the timeout, then answered."""
    connection = bottle.request.environ["longpoll.connection"]
    deadline = time.monotonic() + settings.poll_timeout
    with parking.parked(settings):
        items, after, gap = stream.wait(cursor, settings.poll_timeout)
        # A busy room's answers carry little: news for a client answered a moment
        # ago is held (wakeup.pace()), and what comes meanwhile joins the same answer.
        if items and wakeup.pace(connection, parking.total, deadline):
            # Asked again from the same first item (unless the history has let it
            # go meanwhile: then what was found before the hold is the answer).
            more, newest, dropped = stream.since(items[0]["id"] - 1)
            if not dropped:
                items, after = more, newest
    connection.answered_at = time.monotonic()
    metrics.answered(stream.key, gap)
    checks.no_store()
    bottle.response.content_type = "application/json"
    return stream.answer(items, after, gap)


# Not through Bottle's JSON plugin: the answer is JSON already, and one call less
# in each parked poll's stack is less to save and restore at every switch.
@app.get("/<name>/updates", skip=["json"])
def stream_updates(name):
    if name not in streams:
        checks.fail(404, f"no stream named {name}")
    cursor = checks.parse_cursor()
    # A chat poll may say which browser polls: every poll is a heartbeat.
    browser = here.arrive() if name == "chat" else None
    try:
        return updates(streams[name], cursor)
    finally:
        if browser:
            here.depart(browser)


# -- The chat -----------------------------------------------------------------


reading_past = checks.TokenBucket()    # pages of the chat's past, per address


@app.post("/chat/messages")
@metrics.timed_post
def post_message():
    data = checks.json_body(settings)
    bottle.response.content_type = "application/json"   # for the message's own JSON, in UTF-8
    body = checks.text_field(data, "body", MAX_MESSAGE_CHARS, allowed="\n\t", required=True)
    nick = checks.text_field(data, "nick", checks.MAX_NICK_CHARS, refused=checks.BIDI_CONTROLS) or "anonymous"
    client_id = checks.text_field(data, "client_id", MAX_CLIENT_ID_CHARS)
    try:
        message = {"nick": nick, "body": body, "time": time.time()}
        original = client_id and store.posted(client_id, streams["chat"].key, message)
        if original:
            return checks.json_bytes(original)         # a retry whose first answer was lost
        checks.too_many(posting.take(checks.client_address(settings), settings.post_rate, settings.post_burst),
                        "messages")
        [message], new = streams["chat"].publish(message, client_id=client_id)
    except storage.StoreError:
        checks.fail(503, "the server cannot store messages right now; try again shortly", Retry_After="10")
    # 200 for a copy that raced its original (to another process, say): posted once.
    bottle.response.status = 201 if new else 200
    return checks.json_bytes(message)


@app.get("/chat/messages")
def past_messages():
    """The chat's past, a page at a time and newest first, from the store, which
    keeps --keep messages where memory keeps --history for the polls."""
    before = checks.parse_cursor("before")
    limit = bottle.request.query.get("limit", "50")
    if not (re.fullmatch(r"[0-9]{1,3}", limit) and 1 <= int(limit) <= MAX_PAGE):
        checks.fail(400, f"limit must be a whole number from 1 to {MAX_PAGE}")
    # A flood is refused before it costs anyone else (this process's CPU: counted
    # per process), and held a second first: 400 connections pipelining got 1,900
    # refusals a second, and a bystander waited 0.5-1 s behind them; held, 1 ms.
    wait = reading_past.take(checks.client_address(settings), PAST_RATE, PAST_BURST)
    if wait:
        eventlet.sleep(1)
    checks.too_many(wait, "pages of the past")
    checks.no_store()
    bottle.response.content_type = "application/json"
    chat = streams["chat"]
    # The same bytes for every client that asks the same since the last publish:
    # a thousand readers that never read cost one copy, not a thousand. (The
    # cache is taken before the store is read: a publish meanwhile replaces it.)
    key = (before, int(limit))
    try:
        return remembered(chat.past, key, lambda: past_answer(*store.page(chat.key, *key)))
    except storage.StoreError:
        checks.fail(503, "the server cannot read its messages right now; try again shortly", Retry_After="10")


def past_answer(past, more):
    """A page of the past as an answer of at most MAX_ANSWER_BYTES: the newest of
    it that fit (one at least), and "more" when older ones are left out."""
    newest_first = [checks.json_bytes(item) for item in reversed(past)]
    fit = fitting(newest_first)
    more = more or fit < len(past)
    return b'{"messages":[%s],"more":%s}' % (b",".join(reversed(newest_first[:fit])), b"true" if more else b"false")


# -- Who is here ---------------------------------------------------------------
# The browsers present are worked out in presence.py; here are its routes.


@app.get("/presence")
def who_is_here():
    return here.answer()


@app.get("/presence/updates")
def presence_updates():
    """At once if presence differs from the cursor, else when it changes or at the poll timeout."""
    cursor = checks.parse_cursor()
    if cursor == here.cursor:
        stream = streams["presence"]
        with parking.parked(settings):
            stream.wait(stream.last_id, settings.poll_timeout)
    return here.answer()


@app.post("/chat/leave")
def leave():
    try:
        here.leave(checks.json_body(settings).get("browser"))
    except storage.StoreError:
        checks.fail(503, "the server cannot record that right now", Retry_After="10")
    bottle.response.status = 204


# -- The feed poller ----------------------------------------------------------


class Feed:
    """One feed: what we know of it, and the green thread that checks it on its schedule."""

    fetch_slots = eventlet.Semaphore(FETCH_CONCURRENCY)

    def __init__(self, url):
        self.url = url
        self.title = urllib.parse.urlsplit(url).netloc
        self.ok = False
        self.error = None
        self.last_checked = None
        self.next_check = None
        self.entries = 0            # entries published from this feed so far
        self.etag = self.modified = None
        self.seen = None            # dedupe keys, oldest first; None until the first success
        self.failures = 0
        self.note = None            # something to know beside ok and error (a damaged state dropped)
        self.saved = None           # the state as stored, which a publish must still find there
        self.hub, self.topic = None, url    # the WebSub hub the feed names, and its own (self) URL
        self.pushes_ignored = 0     # pushes to its callback that were not signed with its secret
        self.wake = eventlet.Event()    # sent to check now rather than at next_check

    def resume(self, saved):
        """Take up what the last check stored (before a restart, or in another process),
        as JSON. A damaged state is dropped, and said so: the feed starts afresh,
        its next fetch publishing only its newest few, as a first one does."""
        self.saved = saved
        if not saved:
            return
        try:
            state = json.loads(saved)
            title, etag, modified, entries, seen = (
                state[k] for k in ("title", "etag", "modified", "entries", "seen"))
            if not (isinstance(entries, int) and isinstance(seen, list)
                    and all(isinstance(v, (str, type(None))) for v in (title, etag, modified))):
                raise TypeError("wrong types")
            self.seen = collections.OrderedDict.fromkeys(seen)
        except (TypeError, ValueError, KeyError) as e:
            self.note = f"its stored state was damaged ({type(e).__name__}), so it started afresh"
            return
        self.title, self.etag, self.modified, self.entries = title or self.title, etag, modified, entries

    def status(self):
        return {k: getattr(self, k) for k in
                ("url", "title", "ok", "error", "last_checked", "next_check", "entries", "note")}

    def run(self):
        hurry = False       # woken by its hub's denial: no longer pushed, so fetched at once
        while True:
            # Taken before the check, as Stream.wait() takes its Event before looking:
            # a websub.wake() that lands while the check yields sends this one, not a lost one.
            woken = self.wake = eventlet.Event()
            try:
                # With several processes on one Redis, the one holding a feed's
                # lease checks it; the others wait out the lease, then take up
                # what it learnt. One process alone always holds it.
                delay, report = store.lease(self.url, settings.fetch_timeout + 30)
                if store.shared or self.seen is None:
                    # Alone, what is stored is what this process did; read it only at start.
                    self.resume(store.feed_state(self.url))
                if delay:
                    delay = min(delay, settings.feed_interval)   # to hear of the holder, or take over
                    self.ok, self.error, self.last_checked = (report.get(k) for k in ("ok", "error", "last_checked"))
                else:
                    # Woken early by its hub (a lease to renew), it only plans the
                    # subscription: no hub makes it fetch more often than --feed-interval.
                    early = (self.last_checked or 0) + settings.feed_interval - time.time()
                    delay = websub.keep_pushed(self, self.check() if hurry or early <= 0 else early, settings, store)
                    store.hold(self.url, delay, self.status())
            except storage.StoreError as e:
                self.ok, self.error, delay = False, f"cannot store entries: {e}", settings.feed_interval
            except Exception as e:          # whatever it is, said in /status, and the thread goes on
                self.ok, self.error, delay = False, f"{type(e).__name__}: {e}", settings.feed_interval
            self.next_check = time.time() + delay
            # Or less: a hub's denial, or a lease shorter than the wait, wakes it.
            hurry = woken.wait(delay) == "denied"

    def check(self):
        """Fetch, parse and publish once; return the seconds until the next check."""
        interval = settings.feed_interval
        try:
            with self.fetch_slots:
                fetched = self.fetch()
            if fetched is not None:         # None: 304 Not Modified, nothing new
                body, headers = fetched
                # feedparser is pure Python and slow; in the hub it would freeze
                # every connection, so it runs in eventlet's pool of OS threads.
                title, entries, links = eventlet.tpool.execute(feedtext.parse_feed, body, {
                    "content-type": headers.get("Content-Type", ""), "content-location": self.url})
                self.hub, self.topic = websub.discover(headers.get_all("Link") or [], links, self.url)
                # Validators only from a body that parsed: else a 304 would hide the error.
                self.take_in(title, entries, headers.get("ETag"), headers.get("Last-Modified"))
            self.ok, self.error, self.failures = True, None, 0
            return interval
        except Exception as e:              # whatever goes wrong, the feed's thread lives on
            self.ok, self.failures = False, self.failures + 1
            self.error = (f"cannot store entries: {e}" if isinstance(e, storage.StoreError)
                          else str(e) if isinstance(e, feedtext.FetchError) else f"{type(e).__name__}: {e}")
            # The exponent is capped: 2.0 ** 1024 overflows, which would end this thread.
            backoff = min(interval * 2 ** min(self.failures, 20), max(interval, MAX_BACKOFF))
            return max(backoff, getattr(e, "retry_after", 0))
        finally:
            self.last_checked = time.time()

    def fetch(self):
        """(body, response headers) of the feed, or None if unchanged since the last fetch."""
        return feedtext.fetch(self.url, self.etag, self.modified, settings.fetch_timeout)

    def take_in(self, title, entries, etag, modified):
        """Publish what is new in entries, fetched or pushed. A fetch and a push (or
        pushes to two processes) may both work from the state they read; the store
        takes only the first, and the other works out what is new again."""
        for _ in range(10):
            try:
                return self.publish_new(title, entries, etag, modified)
            except storage.Conflict:
                self.resume(store.feed_state(self.url))
        raise storage.StoreError("the feed's state kept changing while it was being stored")

    def publish_new(self, title, entries, etag, modified):
        """Publish the entries not seen before. They are stored with the feed's new
        state, all or nothing: entries that could not be stored are tried again
        at the next check, which is unconditional since the validators were not kept."""
        title = title or self.title
        first_fetch = self.seen is None
        seen = collections.OrderedDict(self.seen or ())     # a copy, kept only once stored
        new = {}
        for e in entries:
            if e["key"] not in seen:
                new.setdefault(e["key"], e)     # an entry listed twice in one fetch is new once
        for e in reversed(entries):         # oldest first, so the oldest are the ones forgotten
            seen[e["key"]] = None
            seen.move_to_end(e["key"])
        while len(seen) > max(SEEN_PER_FEED, len(entries)):
            seen.popitem(last=False)
        # Feeds list their newest entries first; publish oldest first.
        new = list(new.values())[:FIRST_FETCH_ENTRIES if first_fetch else MAX_NEW_PER_FETCH][::-1]
        state = {"title": title, "etag": etag, "modified": modified,
                 "entries": self.entries + len(new), "seen": list(seen)}
        saved = json.dumps(state)
        streams["feed"].publish(*({"feed": title, "title": e["title"], "link": e["link"], "summary": e["summary"],
                        "published": e["published"]} for e in new), feed=(self.url, saved, self.saved))
        self.title, self.etag, self.modified, self.entries, self.seen, self.saved = (
            title, etag, modified, state["entries"], seen, saved)


# -- Push from WebSub hubs ----------------------------------------------------
# Subscribing, renewing and taking pushes in is websub.py's; here are its routes.


@app.get("/websub/<token>")
def hub_verifies(token):
    return websub.verified(token, settings, store, feeds)


@app.post("/websub/<token>")
def hub_pushes(token):
    return websub.pushed(token, settings, store, feeds)


# -- Status and pages ---------------------------------------------------------


@app.get("/status")
def status():
    checks.no_store()
    try:
        subs = store.subscriptions() if settings.public_url else {}
    except storage.StoreError:
        subs = {}           # the storage row says why
    return {
        "waiting": sum(s.waiting for s in streams.values()),
        "poll_room": parking.places - parking.total,
        "streams": {name: {"last_id": s.last_id, "kept": len(s.items), "waiting": s.waiting}
                    for name, s in streams.items()},
        "feeds": [{**f.status(), "push": websub.push_status(f, subs.get(f.url), settings)} for f in feeds],
        "storage": store.status(),
        # Garbage collections so far, per generation: a full one (the last)
        # scans every parked client's objects; the benchmark counts them.
        "collections": [g["collections"] for g in gc.get_stats()],
    }


def page(name, title):
    # frame-ancestors: no other site may show the chat in a frame and have
    # visitors click or type into it unawares.
    bottle.response.set_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
    return rendered(name, title, settings.poll_timeout)


@functools.cache
def rendered(name, title, poll_timeout):
    # Once per page: it depends on nothing but the flags, and each rendering
    # leaves cycles (Bottle's template environment) for the garbage collector.
    # The page learns the poll timeout, to notice a poll that outlives it on a dead connection.
    return bottle.template(name, title=title, poll_timeout=f"{poll_timeout:g}")


@app.get("/")
def chat_page():
    return page("chat", title="Chat")


@app.get("/feed")
def feed_page():
    return page("feed", title="Feed stream")


@app.get("/static/<path:path>")
def static(path):
    return bottle.static_file(path, root=HERE / "static")


bottle.TEMPLATE_PATH[:] = [str(HERE / "views")]

# -- main() -------------------------------------------------------------------


def main(argv=None):
    global settings, store, posting, streams, here
    settings = flags.parse_args(argv)
    settings.loopback_only = checks.is_loopback(settings.host)
    try:
        # No SO_REUSEPORT: a second copy on a taken port must fail, not share it.
        sock = eventlet.listen((settings.host, settings.port), backlog=4096, reuse_port=False)
    except OSError as e:
        sys.exit(f"longpoll: cannot listen on {settings.host}:{settings.port}: {e.strerror}")
    try:
        if settings.redis:
            store = sharing.RedisStore(settings.redis, settings.history, settings.keep)
            posting = sharing.RedisBuckets(store)
        else:
            store, posting = storage.Store(settings.db, settings.history, settings.keep), checks.TokenBucket()
        streams = open_streams(store, settings.history)
    except storage.StoreError as e:
        where = f"--redis {settings.redis}" if settings.redis else f"--db {settings.db}"
        sys.exit(f"longpoll: {where}: {e}")
    max_clients = frontdoor.pool_size(FD_RESERVE)
    # A tenth of the pool is kept from parked polls, for posts, pages and /status.
    parking.places = max_clients - max_clients // 10

    feeds[:] = [Feed(url) for url in dict.fromkeys(settings.feed)]
    for f in feeds:
        eventlet.spawn(f.run)
    here = presence.Presence(settings, store, streams["presence"])
    eventlet.spawn(here.run)
    metrics.watch(streams, store, feeds, functools.partial(checks.client_address, settings),
                  settings.trusted_proxy + settings.metrics_from)
    # A request leaves no garbage cycles (Protocol, error_body(), rendered()), yet a
    # full collection scans every parked client's objects (half a second at 10,000),
    # mid-wave: start-up's objects are frozen out of its scans for good, and it
    # runs after 100,000 net new objects instead of 700.
    gc.freeze()
    gc.set_threshold(100_000, 10, 10)

    host, port = sock.getsockname()[:2]
    # app.wsgi, not app: a call through Bottle.__call__ is one more C-level frame
    # in the stack every parked poll saves (measured: 0.7 KB a parked client).
    server = frontdoor.serve(sock, app.wsgi, settings, max_clients, wakeup.pause)

    # Ctrl-C or SIGTERM: the hub sleeps in epoll until its next timer, so the
    # signal writes to a pipe that the main green thread waits on, which wakes it at once.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: None)
    print(f"longpoll: serving on http://{host}:{port}/ (chat) and http://{host}:{port}/feed", flush=True)
    eventlet.hubs.trampoline(wake_r, read=True)
    signal.signal(signal.SIGINT, signal.SIG_DFL)    # a second Ctrl-C leaves at once
    # Answer every parked and held poll at once so browsers come back (to the next
    # server) promptly; then let the server finish what it is writing.
    for stream in streams.values():
        stream.close()
    wakeup.release()
    server.kill(SystemExit)
    with eventlet.Timeout(3, False):
        server.wait()
    store.close()
    print("longpoll: stopped", flush=True)


if __name__ == "__main__":
    main()
