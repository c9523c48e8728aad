"""Several longpoll processes sharing both streams through one Redis (--redis URL).

Redis takes the place of the SQLite file, and one thing more: it tells every
process of every item, whichever process published it.

- Each app stream is a Redis Stream whose entry ids are the contract's ids
  (`N-0`). A Lua script gives the next ids and appends them in one atomic step,
  so every process agrees on them.
- follow() is one green thread per process: XREAD BLOCK from the last id it has
  seen, then Stream.add() into the in-memory stream, whose Event wakes the polls
  parked in this process. XREAD resumes from an id, so a dropped connection
  loses nothing.
- What a single process keeps in memory or SQLite lives here instead: the
  client_ids already posted, the flood-control buckets, each feed's state, and
  a lease per feed so one process checks it per interval.

eventlet.monkey_patch() must have run before this module is imported, so that
redis-py's sockets are green.
"""

import json
import sys
import urllib.parse

import eventlet
import redis
import redis.backoff
import redis.retry

from storage import StoreError

PREFIX = "longpoll:"
CLIENT_IDS_KEPT = 3600          # seconds a posted client_id is remembered; a retry comes within minutes

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

# KEYS: counter, stream, client_id key or "", feed key or ""
# ARGV: id seen, history, feed state or "", then each item's fields as JSON.
# Returns {first id} or, for a client_id already posted, {0, id, fields}.
APPEND = COUNTER + """
if KEYS[3] ~= '' then
    local original = redis.call('HMGET', KEYS[3], 'id', 'fields')
    if original[1] then return {0, tonumber(original[1]), original[2]} end
end
local first = n + 1
for i = 4, #ARGV do
    n = n + 1
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], string.format('%d-0', n), 'item', ARGV[i])
end
redis.call('SET', KEYS[1], string.format('%d', n))
if KEYS[3] ~= '' then
    redis.call('HSET', KEYS[3], 'id', string.format('%d', first), 'fields', ARGV[4])
    redis.call('EXPIRE', KEYS[3], """ + str(CLIENT_IDS_KEPT) + """)
end
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[3]) end
return {first}
"""

# KEYS: counter, stream; ARGV: id seen. The stream's newest id, after making sure
# of its counter (see COUNTER), and how many entries it keeps.
TOP = COUNTER + "return {n, redis.call('XLEN', KEYS[2])}"

# A token bucket per client address, as TokenBucket in longpoll.py, on Redis's clock.
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
    """The Store of a process that shares its streams with others through Redis."""

    shared = True       # ids come from Redis, and follow() brings every item into memory

    def __init__(self, url, history):
        self.url, self.history = url, history
        self.error = "not connected yet"
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
        self.take_script = self.redis.register_script(TAKE)

    def call(self, method, *args, **kw):
        """A Redis command; a Redis that cannot be reached is a StoreError."""
        try:
            return method(*args, **kw)
        except redis.RedisError as e:
            self.error = f"Redis: {e}"
            raise StoreError(self.error) from None

    def append(self, stream, batch, seen, client_id=None, feed=None):
        """Give the batch its ids and append it, with what goes with it (as Store.write);
        return the items. A client_id already posted returns its message instead."""
        keys = [PREFIX + stream + ":last", PREFIX + stream,
                PREFIX + "client:" + client_id if client_id else "",
                PREFIX + "feed:" + feed[0] if feed else ""]
        fields = [json.dumps(f) for f in batch]
        reply = self.call(self.append_script, keys, [seen, self.history, json.dumps(feed and feed[1])] + fields)
        if reply[0] == 0:
            return [{"id": reply[1], **json.loads(reply[2])}]
        return [{"id": reply[0] + n, **f} for n, f in enumerate(batch)]

    def posted(self, client_id):
        """The message first posted with this client_id, or None."""
        original = self.call(self.redis.hgetall, PREFIX + "client:" + client_id)
        return original and {"id": int(original["id"]), **json.loads(original["fields"])}

    def take(self, address, rate, burst):
        """TokenBucket.take, for every process at once."""
        return float(self.call(self.take_script, [PREFIX + "bucket:" + address], [rate, burst]))

    def feed_state(self, url):
        return json.loads(self.call(self.redis.get, PREFIX + "feed:" + url) or "null")

    def lease(self, url, seconds):
        """Take the feed's lease for `seconds`: (0, None) if this process now holds it,
        else (seconds left, the holder's last report)."""
        key = PREFIX + "lease:" + url
        if self.call(self.redis.set, key, "{}", nx=True, px=int(seconds * 1000)):
            return 0, None
        report, ms = self.call(self.redis.pipeline(transaction=False).get(key).pttl(key).execute)
        # Never 0, which would mean ours: a lease that ended just now is tried again shortly.
        return max(ms, 10) / 1000, json.loads(report or "{}")

    def hold(self, url, seconds, report):
        """Keep the feed's lease `seconds` more, telling the other processes how the check went."""
        self.call(self.redis.set, PREFIX + "lease:" + url, json.dumps(report), px=max(1, int(seconds * 1000)))

    def follow(self, streams):
        """Bring every item appended by any process into `streams` (Stream objects by
        key), for ever: the one green thread per process that reads Redis."""
        backoff = 0.1
        while True:
            try:
                for s in streams.values():
                    top, kept = self.call(self.top_script, [PREFIX + s.key + ":last", PREFIX + s.key],
                                          [s.last_id], client=self.reader)
                    if not s.last_id:
                        # First contact: as if seen up to just before what Redis keeps,
                        # so that the XREAD below brings the history.
                        s.last_id = top - kept
                self.connected()
                while True:
                    # Up to 5 s, so a silent Redis is noticed by the socket timeout.
                    reply = self.call(self.reader.xread, {PREFIX + s.key: f"{s.last_id}-0" for s in streams.values()},
                                      count=1000, block=5000)
                    self.connected()
                    for name, entries in reply or ():
                        streams[name[len(PREFIX):]].add(list(items(entries)))
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
        """The URL without its password, fit to show."""
        parts = urllib.parse.urlsplit(self.url)
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()

    def status(self):
        return {"redis": self.where(), "ok": self.error is None, "error": self.error}

    def close(self):
        self.redis.close()
        self.reader.close()


def items(entries):
    """The items of XREAD's entries. One this app did not write is skipped, not
    fatal: the reader must go on, and the hole in the ids reports a gap."""
    for entry_id, fields in entries:
        try:
            yield {"id": int(entry_id.split("-")[0]), **json.loads(fields["item"])}
        except (KeyError, TypeError, ValueError):
            print(f"longpoll: skipped Redis entry {entry_id}: not an item of this app", file=sys.stderr, flush=True)
