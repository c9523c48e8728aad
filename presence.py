"""Who is here: the third stream, snapshots of the browsers polling the chat.

Every chat poll that names its browser is a heartbeat; one poll per browser
(the pages' leader tab) makes a browser one entry whatever its tabs. Snapshots
of who is here are worked out at most twice a second, with every process
through the store (its presence() and leave()), and published on the stream
it is handed, which /presence/updates waits on as polls do. A Presence is
handed the settings, the store and that stream by main(); this module uses
bottle, eventlet, the request checks and the store's errors, nothing of longpoll."""

import collections
import hashlib
import itertools
import re
import time

import bottle
import eventlet

import checks
import storage

PRESENCE_TICK = 0.5             # who is here is worked out this often: a wave of joins is a few snapshots
LEAVE_DELAY = 1.5               # a browser that said it left is gone after this, unless it polls again (a reload)
MAX_HERE = 100                  # nicks listed in a presence snapshot, at most
LEAVE_RATE = 2.0                # leaves one address may send a second, over time
LEAVE_BURST = 20                # and at once: an office's browsers closing together


class Presence:
    """The browsers whose chat polls say who they are, while they keep polling."""

    def __init__(self, settings, store, stream):
        self.settings, self.store, self.stream = settings, store, stream   # stream: where snapshots are published
        self.local = {}         # browser -> what this process knows of it (see arrive())
        self.by_address = collections.Counter()     # client address -> browsers it has here
        self.leaves = {}        # browser -> when it said it left
        self.present = {}       # every process's present browsers at the last tick (a leave is for one of them)
        self.leaving = checks.TokenBucket()    # leaves per address
        self.keep({"here": [], "count": 0})

    def keep(self, snapshot):
        self.snapshot, self.cursor = snapshot, digest(snapshot)
        # Encoded once for every watcher it wakes, as the streams' answers are.
        self.encoded = checks.json_bytes({**snapshot, "cursor": self.cursor})

    def arrive(self):
        """A chat poll begins: its browser (validated, or a 400) is present, if it names one."""
        query = bottle.request.query
        browser = query.get("browser")
        if browser is None:
            return None         # curl, other clients: served, not counted
        checked(browser)
        nick = query.getunicode("nick", default=None) if "nick" in query else ""
        if nick is None:
            checks.fail(400, "nick must be UTF-8")
        nick = checks.text_field({"nick": nick}, "nick", checks.MAX_NICK_CHARS, refused=checks.BIDI_CONTROLS)
        entry = self.local.get(browser)
        if entry is None:
            address = checks.client_address(self.settings)
            if self.by_address[address] >= self.settings.present_per_address:
                return None     # one address cannot fill the room: served, not counted
            self.by_address[address] += 1
            # Shared with every process through the store, as a digest: fairness needs no address.
            who = hashlib.sha256(address.encode()).hexdigest()[:16]
            entry = self.local[browser] = {"address": address, "who": who, "polls": 0, "ended": 0}
        entry.update(nick=nick, polled=time.time())
        entry["polls"] += 1
        return browser

    def depart(self, browser):
        """A chat poll of the browser ended; it is present for --presence-grace more."""
        entry = self.local[browser]
        entry["polls"] -= 1
        entry["ended"] = time.time()

    def leave(self, browser):
        checked(browser)
        checks.too_many(self.leaving.take(checks.client_address(self.settings), LEAVE_RATE, LEAVE_BURST), "leaves")
        if browser not in self.local and browser not in self.present:
            return      # not a browser that is here: nothing to store, nothing for every process to read
        self.leaves[browser] = time.time()
        self.store.leave(browser, self.leaves[browser])

    def mine(self, now):
        """{browser: [nick, start of its last poll, until when it is present, its address's digest]} of this process."""
        kept = {}
        grace = self.settings.presence_grace
        for browser, e in list(self.local.items()):
            until = now + grace if e["polls"] else e["ended"] + grace
            if until > now:
                kept[browser] = [e["nick"], e["polled"], until, e["who"]]
            else:
                del self.local[browser]
                self.by_address[e["address"]] -= 1
                if not self.by_address[e["address"]]:
                    del self.by_address[e["address"]]
        return kept

    def tick(self):
        """Work out who is here, with every process (through the store), and publish it if it changed."""
        now = time.time()
        # A leave matters while the browser it names could still be present: one
        # window, here and in every process's store (a store's own could end first).
        since = now - self.settings.presence_grace - 60
        self.leaves = {b: t for b, t in self.leaves.items() if t > since}
        self.present, leaves = self.store.presence(self.mine(now), self.leaves, since)
        # Gone: a browser that left, once LEAVE_DELAY is over, unless a poll began since.
        here = [e for b, e in self.present.items()
                if e[2] > now and not (b in leaves and e[1] <= leaves[b] and now >= leaves[b] + LEAVE_DELAY)]
        by_address = collections.defaultdict(list)
        for e in sorted(here, key=lambda e: -e[1]):         # the most recently active first
            by_address[e[3]].append(e)
        # Each address counts its --present-per-address most active browsers (in
        # every process together), and the nicks listed are one per address
        # before a second from any: one address cannot hide everyone else.
        count, ranked = 0, []
        for entries in by_address.values():
            entries = entries[:self.settings.present_per_address]
            count += len(entries)
            ranked += [(rank, -e[1], e[0]) for rank, e in enumerate(e for e in entries if e[0])]
        listed = dict.fromkeys(nick for *_, nick in sorted(ranked))
        snapshot = {"here": sorted(itertools.islice(listed, MAX_HERE), key=str.casefold), "count": count}
        if snapshot != self.snapshot:
            self.keep(snapshot)
            self.stream.publish(snapshot)

    def run(self):
        while True:
            try:
                self.tick()
            except storage.StoreError:
                pass            # the storage row of /status says why; presence goes on from what it has
            eventlet.sleep(PRESENCE_TICK)

    def answer(self):
        checks.no_store()
        bottle.response.content_type = "application/json"
        return self.encoded


def digest(snapshot):
    """A presence cursor: the same snapshot has the same cursor in every process (52 bits, exact in JavaScript)."""
    return int(hashlib.sha256(checks.json_bytes(snapshot)).hexdigest()[:13], 16)


def checked(browser):
    """A browser id as the pages make them, or a 400."""
    if not (isinstance(browser, str) and re.fullmatch(r"[A-Za-z0-9_-]{8,64}", browser)):
        checks.fail(400, "browser must be 8 to 64 of A-Z, a-z, 0-9, _ and -")
