"""Several longpoll processes sharing their streams through one Redis (--redis URL).

Redis takes the place of the SQLite file, and one thing more: it tells every
process of every item, whichever process published it.

- Each stored stream (the chat and the feed) is a Redis Stream whose entry ids are the contract's ids
  (`N-0`). A Lua script gives the next ids and appends them in one atomic step,
  so every process agrees on them.
- follow() is one green thread per process: XREAD BLOCK from the last id it has
  seen, then deliver() -- Stream.add() of the in-memory stream, whose Event
  wakes the polls parked in this process, exactly as storage.Store delivers
  after its commit. XREAD resumes from an id, so a dropped connection loses
  nothing.
- What a single process keeps in memory or SQLite lives here instead: the
  client_ids already posted, each feed's state, and a lease per feed so one
  process checks it per interval. RedisBuckets is the flood control of every
  process.

eventlet.monkey_patch() must have run before this module is imported, so that
redis-py's sockets are green.
"""

import json
import secrets
import sys
import time
import urllib.parse

import eventlet
import redis
import redis.backoff
import redis.retry

from storage import CLIENT_IDS_KEPT, Conflict, StoreError, records

PREFIX = "longpoll:"

# The ids of a stream come from its counter. A missing counter (Redis wiped) or
# one below an id this process has seen (Redis restored from an older copy)
# starts again from the clock in microseconds -- above every id issued so far --
# so the new ids never repeat an old one and old cursors are told of a gap.
COUNTER = """
local n = tonumber(redis.call('GET', KEYS[1]))
local seen = tonumber(ARGV[1])
if not n or n < seen then
    local t = redis.call('TIME')
    n = math.max(t[1] * 1000000 + t[2], seen)
    redis.call('SET', KEYS[1], string.format('%d', n))
end
"""

# KEYS: counter, stream, client_id key or "" (posted:ID, holding the first id it
# was posted with), feed key or ""
# ARGV: id seen, items kept (--keep), feed state or "", the feed state it was worked out
# from ("" for none), then each item's fields as JSON.
# Returns {first id}; for a client_id already posted, {0, its id}; for a feed
# whose state another process has changed since, {-1} (storage.Conflict).
APPEND = COUNTER + """
if KEYS[3] ~= '' then
    local original = tonumber(redis.call('GET', KEYS[3]))     -- damaged: as if never posted
    if original then return {0, original} end
end
if KEYS[4] ~= '' and (redis.call('GET', KEYS[4]) or '') ~= ARGV[4] then return {-1} end
local first = n + 1
for i = 5, #ARGV do
    n = n + 1
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], string.format('%d-0', n), 'item', ARGV[i])
end
redis.call('SET', KEYS[1], string.format('%d', n))
if KEYS[3] ~= '' then
    redis.call('SET', KEYS[3], string.format('%d', first), 'EX', """ + str(CLIENT_IDS_KEPT) + """)
end
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[3]) end
return {first}
"""

# KEYS: counter, stream; ARGV: id seen. The stream's newest id, after making sure
# of its counter (see COUNTER), and how many entries it keeps.
TOP = COUNTER + "return {n, redis.call('XLEN', KEYS[2])}"

# KEYS: counter; ARGV: a cursor above what this process has seen. Up to the
# counter it was issued (the reader will bring what follows): returned as it
# is. Above the counter but not above the clock, it was issued before Redis
# was restored from an older copy: the counter moves on to the clock, so no new
# id is one that browser already saw, and the new counter is returned (a gap).
# Above the clock no counter ever reached it: -1.
ISSUED = """
local n = tonumber(redis.call('GET', KEYS[1])) or 0
local cursor = tonumber(ARGV[1])
if cursor <= n then return cursor end
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
if cursor > now then return -1 end
redis.call('SET', KEYS[1], string.format('%d', now))
return now
"""

# checks.TokenBucket, written again in Lua because
# several processes must read and update one address's bucket in one step,
# which on Redis only a script does; on Redis's clock, shared by all.
# KEYS: bucket; ARGV: rate, burst. Returns seconds to wait as a string (0: posted).
TAKE = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local b = redis.call('HMGET', KEYS[1], 'tokens', 'time')
local tokens = math.min(burst, (tonumber(b[1]) or burst) + (now - (tonumber(b[2]) or now)) * rate)
if tokens < 1 then return tostring((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'time', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000))
return '0'
"""


class RedisStore:
    """The store of a process that shares its streams with others through Redis:
    storage.Contract, with the ids given by Redis."""

    shared = True       # ids come from Redis, and follow() brings every item into memory

    def __init__(self, url, history, keep=None):
        self.url, self.history, self.keep = url, history, keep or history   # as storage.Store's
        self.error = "not connected yet"   # why Redis cannot be used, while it cannot
        self.write_error = None     # why the last write failed, until a write succeeds
        self.seen = {}              # stream -> the last id the reader delivered
        self.position = {}          # stream -> the entry XREAD goes on after (None: not read yet)
        self.deliver = None         # set by open_streams(): where each item read goes
        self.process = secrets.token_hex(8)     # this process's name in the presence Redis keeps
        self.left = {}              # browser -> when it left, as read from every process's leaves
        self.left_read = None       # the entry of the leaves' stream read last
        # No retries: a write whose answer was lost may have happened, and doing
        # it again would publish twice. The caller answers 503 and the client retries.
        options = dict(decode_responses=True, socket_connect_timeout=2,
                       retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        try:
            self.redis = redis.Redis.from_url(url, socket_timeout=5, **options)
            # The reader blocks up to 5 s in XREAD; its longer timeout notices a dead Redis.
            self.reader = redis.Redis.from_url(url, socket_timeout=15, **options)
        except ValueError as e:
            raise StoreError(str(e)) from None
        self.append_script = self.redis.register_script(APPEND)
        self.top_script = self.redis.register_script(TOP)
        self.issued_script = self.redis.register_script(ISSUED)

    def call(self, method, *args, writes=False, **kw):
        """A Redis command; a Redis that cannot be reached is a StoreError. A
        write that Redis refused (full, read-only) is remembered until a write
        succeeds: such a Redis still answers the reader, whose answers would
        say all is well. One that could not reach it is the reader's to clear."""
        try:
            reply = method(*args, **kw)
        except redis.RedisError as e:
            self.error = f"Redis: {e}"
            if writes and not isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
                self.write_error = self.error
            raise StoreError(self.error) from None
        if writes:
            self.write_error = None
        return reply

    def load(self, stream):
        """(the newest kept items, the last id), at start; the reader goes on from there.
        If Redis cannot be reached yet, nothing: the reader brings the history when it is."""
        self.position[stream] = None
        try:
            top, _ = self.call(self.top_script, [PREFIX + stream + ":last", PREFIX + stream], [0])
            entries = self.call(self.redis.xrevrange, PREFIX + stream, f"{top}-0", "-", count=self.history)
        except StoreError:
            return [], 0
        self.seen[stream], self.position[stream] = top, f"{top}-0"
        return list(items(entries[::-1])), top

    def append(self, stream, batch, client_id=None, feed=None):
        """As storage.Store.append, but Redis gives the ids, and the reader delivers
        them to this process as it does every other process's. The client_id is
        checked in the same script that appends, so of two copies racing to two
        processes one posts and the other is the repeat."""
        keys = [PREFIX + stream + ":last", PREFIX + stream,
                PREFIX + "posted:" + client_id if client_id else "",
                PREFIX + "feed:" + feed[0] if feed else ""]
        fields = [json.dumps(f) for f in batch]
        state, previous = feed[1:] if feed else ("", "")
        reply = self.call(self.append_script, keys,
                          [self.seen.get(stream, 0), self.keep, state, previous or ""] + fields, writes=True)
        if reply[0] == -1:
            raise Conflict(feed[0])
        if reply[0] == 0:
            return [self.item(stream, reply[1], batch[0])], False
        return [{"id": reply[0] + n, **f} for n, f in enumerate(batch)], True

    def item(self, stream, item_id, fields):
        """The item with this id as the stream keeps it; if trimmed since, the id
        with the fields the retry sent (a client_id keeps only the id: a copy of
        every message for an hour would cost Redis more than the history does)."""
        entries = self.call(self.redis.xrange, PREFIX + stream, f"{item_id}-0", f"{item_id}-0")
        return next(items(entries), None) or {"id": item_id, **fields}

    def issued(self, stream, cursor):
        """For a cursor above what this process has seen: the cursor itself if another
        process issued it (wait for what follows), a new id past it if Redis forgot
        it, or None if no counter ever reached it (see ISSUED)."""
        top = self.call(self.issued_script, [PREFIX + stream + ":last"], [cursor])
        return None if top < 0 else top

    def page(self, stream, before, limit):
        """As storage.Store.page(), from the Redis stream, which keeps --keep items."""
        if before == 0:
            return [], False        # nothing is below 0, and "(0-0" is no id to Redis
        newest = "+" if before is None else f"({before}-0"
        entries = self.call(self.redis.xrevrange, PREFIX + stream, newest, "-", count=limit + 1)
        return list(items(entries[:limit][::-1])), len(entries) > limit

    def posted(self, client_id, stream, fields):
        """The message first posted with this client_id (see item()), or None."""
        original = self.call(self.redis.get, PREFIX + "posted:" + client_id)
        return original and original.isdigit() and self.item(stream, int(original), fields) or None

    def feed_state(self, url):
        return self.call(self.redis.get, PREFIX + "feed:" + url)

    def lease(self, url, seconds):
        """Take the feed's lease for `seconds`: (0, None) if this process now holds it,
        else (seconds left, the holder's last report)."""
        key = PREFIX + "lease:" + url
        if self.call(self.redis.set, key, "{}", nx=True, px=int(seconds * 1000), writes=True):
            return 0, None
        report, ms = self.call(self.redis.pipeline(transaction=False).get(key).pttl(key).execute)
        try:
            report = json.loads(report or "{}")
            assert isinstance(report, dict)
        except (ValueError, AssertionError):
            report = {"ok": False, "error": f"the lease key {key} in Redis is damaged; delete it"}
        # Never 0, which would mean ours: a lease that ended just now is tried again shortly.
        return max(ms, 10) / 1000, report

    def hold(self, url, seconds, report):
        """Keep the feed's lease `seconds` more, telling the other processes how the check went."""
        self.call(self.redis.set, PREFIX + "lease:" + url, json.dumps(report), px=max(1, int(seconds * 1000)),
                  writes=True)

    def release(self, url):
        """Give up the feed's lease, whoever holds it: this process checks it next."""
        self.call(self.redis.delete, PREFIX + "lease:" + url, writes=True)

    def subscriptions(self):
        return records(self.call(self.redis.hgetall, PREFIX + "subscriptions").items())

    def subscribe(self, url, record):
        self.call(self.redis.hset, PREFIX + "subscriptions", url, json.dumps(record), writes=True)

    def presence(self, mine, leaves, since):
        """Share this process's present browsers (presence.Presence.mine()) and hear
        every process's, with every leave. Each process keeps its own hash, which
        lapses if the process dies; the browser ids stay in Redis."""
        now = time.time()
        key = PREFIX + "here:" + self.process
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(key)
        if mine:
            pipe.hset(key, mapping={b: json.dumps(e) for b, e in mine.items()})
            pipe.expire(key, 5)
        pipe.zadd(PREFIX + "here", {self.process: now})
        pipe.zremrangebyscore(PREFIX + "here", 0, now - 5)
        pipe.zrange(PREFIX + "here", 0, -1)
        # Only the leaves since the last tick: the whole set twice a second cost every
        # process a third of a core once a flood of leaves had filled it.
        pipe.xread({PREFIX + "leaves": self.left_read or "%d-0" % (since * 1000)}, count=10000)
        *_, processes, left = self.call(pipe.execute, writes=True)
        pipe = self.redis.pipeline(transaction=False)
        for process in processes:
            pipe.hgetall(PREFIX + "here:" + process)
        everyone = {}
        for hash_ in self.call(pipe.execute):
            for browser, text in hash_.items():
                try:
                    nick, polled, until, who = json.loads(text)
                except (TypeError, ValueError):
                    continue
                seen = everyone.get(browser)
                if seen is None or polled > seen[1]:    # the process that had its latest poll has its nick
                    everyone[browser] = [nick, polled, max(until, seen[2] if seen else until), who]
                else:
                    seen[2] = max(seen[2], until)
        for _, entries in left or ():
            self.left_read = entries[-1][0]
            for _, fields in entries:
                try:
                    self.left[fields["browser"]] = float(fields["when"])
                except (KeyError, ValueError):
                    continue
        self.left = {b: t for b, t in self.left.items() if t > since}
        return everyone, {**self.left, **leaves}

    def leave(self, browser, when):
        # A stream, so that each process reads only what is new (see presence()).
        self.call(self.redis.xadd, PREFIX + "leaves", {"browser": browser, "when": repr(when)},
                  maxlen=10000, approximate=True, writes=True)

    def start(self):
        """Start the reader: this process learns of every item, its own included, from Redis."""
        eventlet.spawn(self.follow, list(self.position))

    def follow(self, streams):
        """Deliver every item appended by any process to the streams (by key), for
        ever: the one green thread per process that reads Redis."""
        backoff = 0.1
        while True:
            try:
                for key in streams:
                    top, kept = self.call(self.top_script, [PREFIX + key + ":last", PREFIX + key],
                                          [self.seen.get(key, 0)], client=self.reader)
                    if self.position[key] is None:
                        # First contact: as if seen up to just before the newest
                        # --history of what Redis keeps, so that the XREAD below brings them.
                        self.seen[key] = top - min(kept, self.history)
                        self.position[key] = f"{self.seen[key]}-0"
                self.connected()
                while True:
                    # Up to 5 s, so a silent Redis is noticed by the socket timeout.
                    reply = self.call(self.reader.xread, {PREFIX + key: self.position[key] for key in streams},
                                      count=1000, block=5000)
                    self.connected()
                    for name, entries in reply or ():
                        key = name[len(PREFIX):]
                        # Past every entry read, usable or not: an entry this app
                        # did not write is read once, never again and again.
                        self.position[key] = entries[-1][0]
                        batch = list(items(entries))
                        if batch:
                            self.seen[key] = batch[-1]["id"]
                            self.deliver(key, batch)
                    backoff = 0.1
            except StoreError:
                if backoff == 0.1:
                    print(f"longpoll: cannot use Redis at {self.where()} ({self.error.removeprefix('Redis: ')}); "
                          "posts get 503 until it answers; retrying", file=sys.stderr, flush=True)
                eventlet.sleep(backoff)
                backoff = min(backoff * 2, 5)

    def connected(self):
        """Note that Redis answers; say so if it had not."""
        if self.error:
            if self.error != "not connected yet":
                print(f"longpoll: Redis is back at {self.where()}", file=sys.stderr, flush=True)
            self.error = None

    def where(self):
        return without_credentials(self.url)

    def status(self):
        error = self.write_error or self.error
        return {"redis": self.where(), "ok": error is None, "error": error}

    def close(self):
        self.redis.close()
        self.reader.close()


class RedisBuckets:
    """Flood control for every process at once: TokenBucket's take() on Redis (see TAKE)."""

    def __init__(self, store):
        self.store = store
        self.take_script = store.redis.register_script(TAKE)

    def take(self, address, rate, burst):
        return float(self.store.call(self.take_script, [PREFIX + "bucket:" + address], [rate, burst], writes=True))


def without_credentials(url):
    """The URL without its user name and password, fit to show."""
    parts = urllib.parse.urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def items(entries):
    """The items of XREAD's entries. One this app did not write is skipped, not
    fatal: the reader must go on, and the hole in the ids reports a gap."""
    for entry_id, fields in entries:
        try:
            item = json.loads(fields["item"])
            if not isinstance(item, dict):
                raise TypeError("not an object")
            item.pop("id", None)        # the entry's id is the item's, whatever its fields say
            yield {"id": int(entry_id.removesuffix("-0")), **item}
        except (KeyError, TypeError, ValueError):
            print(f"longpoll: skipped Redis entry {entry_id}: not an item of this app", file=sys.stderr, flush=True)
