#!/usr/bin/env python3
"""Soak test of longpoll.py: a mixed load with faults for N minutes, then a
count of lost and duplicated messages and a record of memory over time.

It starts longpoll.py on a free loopback port and runs, in green threads:
  - pollers that follow the chat like browsers do, some of them dropping their
    connection mid-poll now and then and coming back with their cursor;
  - posters (each from its own 127.0.0.x address) that post with a client_id
    and sometimes hang up before the answer, then retry with the same id;
  - vandals: polls abandoned mid-wait, requests never finished, bad input;
  - hostile clients: requests sent a byte a second (each must be cut off at
    --client-timeout), clients that ask for the history and never read it,
    history floods (a tight loop of polls without a cursor), and chunked or
    ambiguous bodies (a 4xx each). Some posts are 2,000 emoji long, so the
    history answers are as large as they can be.
At the end every poller must have seen every posted message exactly once.
With --processes N, N processes share a Redis of the soak's own, and every
request goes to one of them at random, as through a balancer without stickiness.

    python soak.py --minutes 10
    python soak.py --minutes 10 --processes 2
"""

import argparse
import json
import os
import random
import resource
import sys
import time
import uuid

import warnings
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")   # the README says so
import eventlet  # noqa: E402
from eventlet.green import socket  # noqa: E402
from eventlet.green.http import client as http_client  # noqa: E402

from bench import App, Redis  # noqa: E402



class Soak:
    def __init__(self, apps, minutes):
        self.apps = apps
        self.end = time.monotonic() + minutes * 60     # posting and vandalism stop then
        self.poll_end = self.end + 3600                 # polling stops once all is delivered
        self.posted = {}                # message id -> client_id
        self.errors = []
        self.retries = self.bad_requests = self.vanished = 0
        self.hostile_done = {"slow": 0, "non-readers": 0, "history polls": 0, "bad framing": 0}

    def address(self):
        """A process to send a request to: any of them, as a balancer without stickiness would."""
        app = random.choice(self.apps)
        return app.host, app.port

    def connection(self, source="127.0.0.1", timeout=30):
        return http_client.HTTPConnection(*self.address(), timeout=timeout, source_address=(source, 0))

    def error(self, what):
        self.errors.append(what)
        if len(self.errors) <= 10:
            print("error:", what, flush=True)

    def poller(self, fickle):
        """Follow the chat; return the ids seen, in order."""
        seen, cursor, conn = [], None, self.connection()
        while time.monotonic() < self.poll_end:
            path = "/chat/updates" + ("" if cursor is None else f"?cursor={cursor}")
            try:
                if fickle and random.random() < 0.05:       # hang up mid-poll, come back later
                    conn.request("GET", path)
                    eventlet.sleep(random.random())
                    conn.close()
                    self.vanished += 1
                    conn = self.connection()
                    continue
                conn.request("GET", path)
                resp = conn.getresponse()
                body = json.loads(resp.read())
                if resp.status != 200:
                    self.error(f"poll answered {resp.status}")
                    continue
            except (OSError, http_client.HTTPException) as e:
                self.error(f"poll failed: {e!r}")
                conn = self.connection()
                continue
            if body.get("gap"):
                self.error("gap reported")
            seen += [m["id"] for m in body["messages"]]     # the first answer is the history
            cursor = body["cursor"]
        return seen

    def poster(self, address, per_second):
        while time.monotonic() < self.end:
            eventlet.sleep(random.expovariate(per_second))
            text = f"soak {uuid.uuid4()}" + (" " + "\N{GRINNING FACE}" * 1950 if random.random() < 0.1 else "")
            message = json.dumps({"nick": address, "body": text, "client_id": uuid.uuid4().hex})
            for attempt in range(10):
                try:
                    conn = self.connection(address, timeout=10)
                    conn.request("POST", "/chat/messages", message, {"Content-Type": "application/json"})
                    if attempt == 0 and random.random() < 0.1:
                        conn.close()                 # the answer is lost: retry with the same client_id
                        self.retries += 1
                        continue
                    resp = conn.getresponse()
                    body = json.loads(resp.read())
                    conn.close()
                except (OSError, http_client.HTTPException) as e:
                    self.error(f"post failed: {e!r}")
                    continue
                if resp.status in (200, 201):
                    self.posted[body["id"]] = json.loads(message)["client_id"]
                    break
                self.error(f"post answered {resp.status}: {body}")
                break

    def vandal(self):
        bad = [b"{nick:", json.dumps({"body": ""}).encode(), json.dumps({"body": "x" * 3000}).encode()]
        while time.monotonic() < self.end:
            eventlet.sleep(random.random() * 0.5)
            kind = random.randrange(3)
            try:
                if kind == 0:                   # a request never finished
                    sock = socket.create_connection(self.address())
                    sock.sendall(b"GET /chat/upd")
                    eventlet.spawn_after(random.random() * 3, sock.close)
                elif kind == 1:                 # a poll abandoned while it waits
                    sock = socket.create_connection(self.address())
                    sock.sendall(b"GET /chat/updates?cursor=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % (10 ** 17))
                    eventlet.spawn_after(random.random() * 3, sock.close)
                else:                           # bad input: a 4xx, never a 5xx
                    conn = self.connection("127.0.0.250")
                    conn.request("POST", "/chat/messages", random.choice(bad), {"Content-Type": "application/json"})
                    status = conn.getresponse().status
                    conn.close()
                    self.bad_requests += 1
                    if not 400 <= status < 500:
                        self.error(f"bad input answered {status}")
            except OSError as e:
                self.error(f"vandal failed: {e!r}")


    def hostile(self, n, client_timeout):
        """One hostile client at a time, from its own address, until the end."""
        source = f"127.0.2.{n + 1}"
        while time.monotonic() < self.end:
            kind = random.choice(list(self.hostile_done))
            try:
                sock = socket.create_connection(self.address(), source_address=(source, 0))
                if kind == "slow":              # a byte a second, each well inside a per-read timeout
                    started = time.monotonic()
                    request = b"GET /chat/updates HTTP/1.1\r\nHost: localhost\r\n\r\n"
                    try:
                        for byte in request:
                            sock.sendall(bytes([byte]))
                            eventlet.sleep(1)
                        self.error("a slow request was sent whole")
                    except OSError:
                        pass                    # cut off, as it must be
                    if time.monotonic() - started > client_timeout + 3:
                        self.error(f"a slow request held its connection {time.monotonic() - started:.0f} s")
                elif kind == "non-readers":     # ask for the history, never read it, hang up later
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    sock.sendall(b"GET /chat/updates HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    eventlet.sleep(random.random() * 10)
                elif kind == "history polls":   # a tight loop of history answers, read whole
                    conn = self.connection(source)
                    for _ in range(50):
                        conn.request("GET", "/chat/updates")
                        conn.getresponse().read()
                    conn.close()
                else:
                    sock.sendall(random.choice([
                        b"POST /chat/messages HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                        + b"f" * 100_000,
                        b"POST /chat/messages HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
                        b"Content-Length: 9\r\n\r\n{}"]))
                    status = sock.recv(100)[9:12]
                    if not status.startswith(b"4"):
                        self.error(f"bad framing answered {status!r}")
                self.hostile_done[kind] += 1
                sock.close()
            except (OSError, http_client.HTTPException) as e:
                self.error(f"hostile {kind} failed: {e!r}")


def main():
    p = argparse.ArgumentParser(description="Soak test of longpoll.py with faults.")
    p.add_argument("--minutes", type=float, default=10, help="how long to run (default: 10)")
    p.add_argument("--pollers", type=int, default=300, help="clients following the chat (default: 300)")
    p.add_argument("--posters", type=int, default=10, help="posting clients, one address each (default: 10)")
    p.add_argument("--rate", type=float, default=1.0, help="messages a second per poster (default: 1)")
    p.add_argument("--processes", type=int, default=1,
                   help="app processes; more than 1 share a Redis the soak starts (default: 1)")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # The default --history: memory should level off once the history and the
    # client_id memory are full.
    redis = Redis() if args.processes > 1 else None
    flags = ("--redis", redis.url) if redis else ()
    apps = [App("--feeds", os.devnull, "--poll-timeout", "5", "--client-timeout", "5", *flags)
            for _ in range(args.processes)]
    for app in apps:
        app.wait_until(lambda s: s["storage"]["ok"], 30, "the connection to Redis")
    soak = Soak(apps, args.minutes)
    pollers = [eventlet.spawn(soak.poller, fickle=n % 3 == 0) for n in range(args.pollers)]
    posters = [eventlet.spawn(soak.poster, f"127.0.1.{n + 1}", args.rate) for n in range(args.posters)]
    vandals = [eventlet.spawn(soak.vandal) for _ in range(5)]
    vandals += [eventlet.spawn(soak.hostile, n, 5) for n in range(20)]
    print(f"{'minute':>6} {'RSS MB':>7} {'posted':>7} {'errors':>6}", flush=True)
    memory, started = [], time.monotonic()
    while time.monotonic() < soak.end:
        eventlet.sleep(min(60, soak.end - time.monotonic()))
        memory.append(sum(app.rss() for app in apps) / 2 ** 20)
        print(f"{(time.monotonic() - started) / 60:6.1f} {memory[-1]:7.1f} {len(soak.posted):7d} "
              f"{len(soak.errors):6d}", flush=True)
    for g in posters + vandals:
        g.wait()
    eventlet.sleep(6)                           # let the last posts reach the pollers
    soak.poll_end = time.monotonic()            # then the pollers stop after their next answer
    views = [g.wait() for g in pollers]
    for app in apps:
        app.stop()
    if redis:
        redis.stop()
    expected = sorted(soak.posted)
    lost = sum(len(set(expected) - set(v)) for v in views)
    # A post made twice would show as an id nobody was answered with.
    duplicated = sum(len(v) - len(set(v)) + len(set(v) - set(expected)) for v in views)
    out_of_order = sum(v != sorted(v) for v in views)
    print(f"\n{args.minutes:g} min, {args.pollers} pollers, {args.posters} posters: {len(expected)} messages posted "
          f"({soak.retries} retried after a lost answer), {soak.vanished} polls dropped mid-wait, "
          f"{soak.bad_requests} bad requests; hostile: " + ", ".join(f"{n} {k}" for k, n in soak.hostile_done.items()) + ".")
    print(f"lost {lost}, duplicated {duplicated}, out of order {out_of_order}, errors {len(soak.errors)}; "
          f"RSS {memory[0]:.1f} MB after the first minute, {max(memory):.1f} MB at most, "
          f"{memory[-1]:.1f} MB at the end.")
    sys.exit(1 if lost or duplicated or out_of_order or soak.errors else 0)


if __name__ == "__main__":
    main()
