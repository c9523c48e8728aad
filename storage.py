"""What longpoll keeps across a restart, in one embedded SQLite file.

The streams live in memory, where Stream.wait() reads them. Every publish is
written here first, in one transaction with what goes with it -- a chat
message's client_id, a feed's dedupe memory and validators -- and main() loads
the newest items back at start, so ids continue where they stopped. All the SQL
of the app is in this file.
"""

import json
import sqlite3

SCHEMA_VERSION = 1
# MIGRATIONS[v] takes a database from schema version v to v + 1; a new file is version 0.
MIGRATIONS = [
    [
        "CREATE TABLE items (stream TEXT NOT NULL, id INTEGER NOT NULL, item TEXT NOT NULL,"
        " PRIMARY KEY (stream, id)) WITHOUT ROWID",
        # Oldest first by rowid, so the oldest are the ones forgotten.
        "CREATE TABLE client_ids (client_id TEXT PRIMARY KEY, item TEXT NOT NULL)",
        "CREATE TABLE feeds (url TEXT PRIMARY KEY, state TEXT NOT NULL)",
    ],
]


class StoreError(Exception):
    """The database cannot be opened or written; the message says why, for people."""


class Store:
    """One SQLite file, owned by this process for as long as it runs."""

    shared = False      # this process gives every id itself (see sharing.RedisStore)

    def __init__(self, path, history):
        self.path, self.history = path, history
        self.error = None           # why the last write failed, while it is failing
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
            raise StoreError(explain(e)) from None

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
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def items(self, stream):
        """The newest kept items of a stream, oldest first."""
        rows = self.db.execute(
            "SELECT item FROM (SELECT id, item FROM items WHERE stream = ? ORDER BY id DESC LIMIT ?)"
            " ORDER BY id", (stream, self.history))
        return [json.loads(item) for item, in rows]

    def posted(self, client_id):
        """The message first posted with this client_id, or None."""
        row = self.db.execute("SELECT item FROM client_ids WHERE client_id = ?", (client_id,)).fetchone()
        return row and json.loads(row[0])

    def feed_state(self, url):
        row = self.db.execute("SELECT state FROM feeds WHERE url = ?", (url,)).fetchone()
        return row and json.loads(row[0])

    def write(self, stream, items, client_id=None, feed=None):
        """Store new items, with the client_id they were posted with or the (url, state)
        of the feed they came from, all in one transaction; raise StoreError if not."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT INTO items VALUES (?, ?, ?)",
                                [(stream, item["id"], json.dumps(item)) for item in items])
            if items:
                self.db.execute("DELETE FROM items WHERE stream = ? AND id <= ?",
                                (stream, items[-1]["id"] - self.history))
            if client_id:
                self.db.execute("INSERT INTO client_ids VALUES (?, ?)", (client_id, json.dumps(items[0])))
                # A retry comes within minutes; ten histories' worth is plenty.
                self.db.execute("DELETE FROM client_ids WHERE rowid <= (SELECT max(rowid) FROM client_ids) - ?",
                                (10 * self.history,))
            if feed:
                url, state = feed
                self.db.execute("INSERT OR REPLACE INTO feeds VALUES (?, ?)", (url, json.dumps(state)))
            self.db.execute("COMMIT")
            self.error = None
        except sqlite3.Error as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            self.error = explain(e)
            raise StoreError(self.error) from None

    def lease(self, url, seconds):
        """A feed's lease (see sharing.RedisStore): one process always holds it."""
        return 0, None

    def hold(self, url, seconds, report):
        pass

    def status(self):
        return {"db": self.path, "ok": self.error is None, "error": self.error}

    def close(self):
        self.db.close()


def explain(error):
    """What a SQLite error means for someone running longpoll."""
    text = str(error)
    if "locked" in text:
        return "another copy of longpoll is using this file; one process owns a database"
    if "not a database" in text or "malformed" in text:
        return "not a longpoll database, or damaged: move it away to start afresh"
    if "unable to open" in text:
        return "cannot create or open the file: does its folder exist, and may we write there?"
    if "readonly" in text:
        return "the file cannot be written (read-only?)"
    if "full" in text or "I/O" in text:
        return f"cannot write: {text} (is the disk full?)"
    return text
