"""What longpoll keeps across a restart, in one embedded SQLite file.

The streams live in memory, where Stream.wait() reads them. This store gives
each published item its id and writes it first, in one transaction with what
goes with it -- a chat message's client_id, a feed's dedupe memory and
validators -- and only then hands it to the stream (deliver), so nothing a
browser was shown or a POST was acknowledged for is lost to a crash. Each
stream's last id is kept too, so a restart continues the ids even of a stream
nobody has published to. All the SQL of the app is in this file.

The store contract is written here once: StreamContract, what a Stream asks
of its store, and Contract, what the rest of the app asks too. Store meets it
in one process, sharing.RedisStore on Redis for several, and Unkept is the
store of a stream not stored (it meets StreamContract).
"""

import json
import os
import sqlite3
import sys
import time
import typing

SCHEMA_VERSION = 3
# MIGRATIONS[v] takes a database from schema version v to v + 1; a new file is version 0.
MIGRATIONS = [
    [
        "CREATE TABLE items (stream TEXT NOT NULL, id INTEGER NOT NULL, item TEXT NOT NULL,"
        " PRIMARY KEY (stream, id)) WITHOUT ROWID",
        "CREATE TABLE client_ids (client_id TEXT PRIMARY KEY, item TEXT NOT NULL)",
        "CREATE TABLE feeds (url TEXT PRIMARY KEY, state TEXT NOT NULL)",
    ],
    [
        # A stream's last id, kept even when it has no items left (or never had one).
        "CREATE TABLE streams (stream TEXT PRIMARY KEY, last_id INTEGER NOT NULL)",
        "INSERT INTO streams SELECT stream, max(id) FROM items GROUP BY stream",
        # client_ids are remembered for a time, not a count: a flood of posts
        # must not push out the one a retry is about to ask for.
        "ALTER TABLE client_ids ADD COLUMN time REAL NOT NULL DEFAULT 0",
        "UPDATE client_ids SET time = CAST(strftime('%s', 'now') AS REAL)",
        "CREATE INDEX client_ids_by_time ON client_ids (time)",
    ],
    [
        # A feed's WebSub subscription (callback token, secret, hub, lease), so a
        # restart neither breaks the callback the hub knows nor needs a new verification.
        "CREATE TABLE subscriptions (feed TEXT PRIMARY KEY, record TEXT NOT NULL)",
    ],
]
CLIENT_IDS_KEPT = 3600      # seconds a posted client_id is remembered; a retry comes within minutes


def clock_id():
    """The first id of a new stream: the clock in microseconds, so that even after
    its database is deleted the new ids are above every old cursor, and a returning
    browser is told of a gap instead of silently skipping what it missed."""
    return time.time_ns() // 1000


class StoreError(Exception):
    """The database cannot be opened or written; the message says why, for people."""


class Conflict(Exception):
    """A feed's state changed since it was read: another check or push published
    from it first. Read it again and work out what is new afresh."""


class StreamContract(typing.Protocol):
    """What a Stream asks of its store. Store, sharing.RedisStore and Unkept
    (the store of a stream not stored) each have these."""

    deliver: typing.Callable    # set by open_streams(): deliver(stream, items) hands a stored batch to its Stream

    def load(self, stream):
        """At start: (the newest kept items, oldest first; the stream's last id)."""

    def append(self, stream, batch, **record):
        """Give each item of batch its id, keep it (with what record says goes with it),
        deliver it; return (the items, True), or ([an original], False) for a repeat."""

    def issued(self, stream, cursor):
        """For a cursor above every id this process has seen: the id to wait after
        if it was given out (elsewhere), None if never. Stream.resolve() asks it."""


class Contract(StreamContract, typing.Protocol):
    """The store contract: what the app asks of the store of its kept streams
    (--db or --redis), beside what a Stream asks. Store and sharing.RedisStore
    each have all of these; a method that does nothing for one says why."""

    shared: bool    # whether other processes publish too (then a feed's state is read afresh before each check)

    def posted(self, client_id, stream, fields):
        """The message first posted with this client_id, lately, or None (a retry's dedupe)."""

    def page(self, stream, before, limit):
        """(up to limit of the newest items below id before, oldest first; whether older are kept)."""

    def feed_state(self, url):
        """What the last check of a feed stored (JSON text), or None."""

    def lease(self, url, seconds):
        """Take a feed's lease to check it: (0, None) if held now, else (seconds left, the holder's report)."""

    def hold(self, url, seconds, report):
        """Keep the feed's lease seconds more, and report how its check went."""

    def release(self, url):
        """Give up the feed's lease, whoever holds it (a hub's denial: checked here next)."""

    def subscriptions(self):
        """Each feed's WebSub subscription, by feed URL."""

    def subscribe(self, url, record):
        """Keep (or replace) a feed's WebSub subscription."""

    def presence(self, mine, leaves, since):
        """Share this process's present browsers and its leaves: (everyone's browsers,
        everyone's leaves made after the time `since`)."""

    def leave(self, browser, when):
        """Record that a browser said it left, for every process to hear."""

    def start(self):
        """Begin delivering what other processes publish, once the Streams are open."""

    def status(self):
        """The storage row of /status: where, whether it works, and why not."""

    def close(self):
        """At shutdown."""


class Store:
    """One SQLite file, owned by this process for as long as it runs: the
    Contract above, for a process alone (sharing.RedisStore is the same for several)."""

    shared = False      # this process gives every id itself (see sharing.RedisStore)

    def __init__(self, path, history, keep=None):
        # history: the newest items load() gives the stream; keep: the items kept,
        # for page() (the chat's past), at least history.
        self.path, self.history, self.keep = path, history, keep or history
        self.error = None           # why the last write failed, while it is failing
        self.last_ids = {}          # stream -> its last id; this process alone gives ids
        self.deliver = None         # set by open_streams(): where each stored batch goes
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=0)
            # Exclusive locking: the first transaction's lock is kept until the
            # process ends (SIGKILL included), so a second copy on the same file
            # fails at once instead of interleaving ids with this one.
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a commit is in the OS's hands before COMMIT
            # returns, so killing the process (even with SIGKILL) loses nothing
            # acknowledged; only a power cut or kernel crash can lose the last
            # commits, never corrupt the file. FULL would fsync every post.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("BEGIN EXCLUSIVE")
            self.migrate()
            self.db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(explain(e, path)) from None

    def migrate(self):
        if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise sqlite3.DatabaseError("database disk image is malformed")
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"written by a newer version of longpoll (schema {version}; this one "
                             f"knows {SCHEMA_VERSION}): run that version, or move the file away")
        for steps in MIGRATIONS[version:]:
            for statement in steps:
                self.db.execute(statement)
        if version < SCHEMA_VERSION:
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def load(self, stream):
        """(the newest kept items of a stream, oldest first; its last id), at start.
        Damaged contents are reported, and the rest is served: a row that is not
        an item is left out, and a last id that is not a number goes on from the clock."""
        row = self.db.execute("SELECT last_id FROM streams WHERE stream = ?", (stream,)).fetchone()
        if row is None or not isinstance(row[0], int):
            if row is not None:
                self.warn(f"the last id of {stream} is damaged ({row[0]!r}); ids go on from the clock")
            row = (clock_id() - 1,)
            self.transaction(lambda: self.db.execute("INSERT OR REPLACE INTO streams VALUES (?, ?)",
                                                     (stream, row[0])))
        self.last_ids[stream] = row[0]
        items, _ = self.page(stream, None, self.history)
        return items, row[0]

    def page(self, stream, before, limit):
        """(up to limit of the newest items with ids below before -- None: of all --
        oldest first; whether older ones are kept). A damaged row is left out."""
        try:
            rows = self.db.execute("SELECT id, item FROM items WHERE stream = ? AND id < ? ORDER BY id DESC LIMIT ?",
                                   (stream, 2 ** 63 - 1 if before is None else before, limit + 1)).fetchall()
        except sqlite3.Error as e:
            raise StoreError(explain(e, self.path)) from None
        items = []
        for item_id, text in reversed(rows[:limit]):
            try:
                if not isinstance(item_id, int):
                    raise TypeError("not an id")
                items.append({**json.loads(text), "id": item_id})   # ** refuses JSON that is not an object
            except (TypeError, ValueError):
                self.warn(f"left out a damaged item of {stream} (row id {item_id!r})")
        return items, len(rows) > limit

    def warn(self, what):
        print(f"longpoll: --db {self.path}: {what}; delete the row, or move the file away to start afresh",
              file=sys.stderr, flush=True)

    def append(self, stream, batch, client_id=None, feed=None):
        """Give each item (a dict of fields) the next id and store it, with the
        client_id it was posted with or the feed it came from -- (url, its new
        state, the state it was worked out from), states as JSON text -- all in one
        transaction; then deliver it. Return (items, True), or ([the original],
        False) for a client_id already posted. StoreError if it cannot be
        written, Conflict if the feed's state is no longer the one given: then
        nothing is published."""
        original = client_id and self.posted(client_id, stream, batch[0])
        if original:
            return [original], False
        last = self.last_ids[stream]
        items = [{"id": last + n, **fields} for n, fields in enumerate(batch, 1)]

        def write():
            self.db.executemany("INSERT INTO items VALUES (?, ?, ?)",
                                [(stream, item["id"], json.dumps(item)) for item in items])
            if items:
                self.db.execute("DELETE FROM items WHERE stream = ? AND id <= ?",
                                (stream, items[-1]["id"] - self.keep))
                self.db.execute("UPDATE streams SET last_id = ? WHERE stream = ?", (items[-1]["id"], stream))
            if client_id:
                now = time.time()
                self.db.execute("DELETE FROM client_ids WHERE time < ?", (now - CLIENT_IDS_KEPT,))
                self.db.execute("INSERT OR REPLACE INTO client_ids VALUES (?, ?, ?)",
                                (client_id, json.dumps(items[0]), now))
            if feed:
                url, state, previous = feed
                if self.feed_state(url) != previous:
                    raise Conflict(url)
                self.db.execute("INSERT OR REPLACE INTO feeds VALUES (?, ?)", (url, state))
        self.transaction(write)
        if items:
            self.last_ids[stream] = items[-1]["id"]
        self.deliver(stream, items)
        return items, True

    def transaction(self, write):
        try:
            self.db.execute("BEGIN IMMEDIATE")
            write()
            self.db.execute("COMMIT")
            self.error = None
        except Conflict:
            self.db.execute("ROLLBACK")
            raise
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.error = explain(e, self.path)
            raise StoreError(self.error) from None

    def issued(self, stream, cursor):
        """For a cursor above the stream's last id: the id to go on from, or None if
        it was never given out. Here it never was: this process gives every id."""
        return None

    def posted(self, client_id, stream, fields):
        """The message first posted with this client_id within CLIENT_IDS_KEPT, or None.
        (stream and fields, the message as the retry sent it, are for a store that
        keeps only the id; this one keeps the whole message, on disk.)"""
        row = self.db.execute("SELECT item FROM client_ids WHERE client_id = ? AND time >= ?",
                              (client_id, time.time() - CLIENT_IDS_KEPT)).fetchone()
        return row and json.loads(row[0])

    def feed_state(self, url):
        """What the last check of a feed stored (see Feed.resume(), which copes with damage)."""
        row = self.db.execute("SELECT state FROM feeds WHERE url = ?", (url,)).fetchone()
        return row and row[0]

    def subscriptions(self):
        """Each feed's WebSub subscription, by feed URL (a damaged one is left out:
        the feed subscribes afresh)."""
        return records(self.db.execute("SELECT feed, record FROM subscriptions"))

    def subscribe(self, url, record):
        """Keep (or replace) a feed's WebSub subscription."""
        self.transaction(lambda: self.db.execute("INSERT OR REPLACE INTO subscriptions VALUES (?, ?)",
                                                 (url, json.dumps(record))))

    def presence(self, mine, leaves, since):
        """(every process's present browsers, every leave): here, only this process's."""
        return mine, leaves

    def leave(self, browser, when):
        """Nothing to share: Presence keeps this process's leaves itself."""

    def start(self):
        """Nothing to follow: every item here was published by this process."""

    def lease(self, url, seconds):
        """A feed's lease (see sharing.RedisStore): one process always holds it."""
        return 0, None

    def hold(self, url, seconds, report):
        """Nothing to keep: no other process waits on the lease."""

    def release(self, url):
        """Nothing to give up: this process always holds the lease."""

    def status(self):
        return {"db": self.path, "ok": self.error is None, "error": self.error}

    def close(self):
        self.db.close()


def records(rows):
    """{key: record} of (key, JSON object) rows, leaving out any that is not one."""
    kept = {}
    for key, text in rows:
        try:
            record = json.loads(text)
            if isinstance(record, dict):
                kept[key] = record
        except (TypeError, ValueError):
            pass
    return kept


def explain(error, path):
    """What a SQLite error means for someone running longpoll."""
    text = str(error)
    try:
        disk = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        disk = None
    if "locked" in text:
        return "another copy of longpoll is using this file; one process owns a database"
    if "not a database" in text or "malformed" in text:
        return "not a longpoll database, or damaged: move it away to start afresh"
    if "unable to open" in text:
        return "cannot create or open the file: does its folder exist, and may we write there?"
    if disk and disk.f_flag & os.ST_RDONLY:
        return f"cannot write: {text} (the file system is mounted read-only)"
    if "readonly" in text:
        return "the file cannot be written (read-only?)"
    if "full" in text or "I/O" in text:
        why = "the disk is full" if disk and disk.f_bavail == 0 else "is the disk full, or a file size limit reached?"
        return f"cannot write: {text} ({why})"
    return text


class Unkept:
    """The store of a stream that is not stored (presence's snapshots): the
    StreamContract, with ids given by this process and nothing kept, as a
    snapshot is worth nothing after a restart."""

    def __init__(self):
        self.deliver, self.last_id = None, 0

    def load(self, stream):
        return [], 0        # nothing kept: ids start afresh at each start

    def append(self, stream, batch, **record):
        # record: nothing is kept beside a snapshot, as nothing is kept at all
        items = [{"id": self.last_id + n, **fields} for n, fields in enumerate(batch, 1)]
        self.last_id += len(items)
        self.deliver(stream, items)
        return items, True

    def issued(self, stream, cursor):
        return None         # every id it gave, this process has seen
