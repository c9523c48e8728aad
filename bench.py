#!/usr/bin/env python3
"""Benchmark of longpoll.py: fan-out to N parked clients, memory per client,
throughput, and the feed poller at scale.

It starts longpoll.py as a separate process on a free port and drives it from
this process over loopback: one epoll loop holds every client connection, so
the load generator stays cheap next to the server. The busy room (--busy,
--scale-out) spreads its clients over several such processes, since one
reads at most about 10,000 answers a second. Standard library only.

    python bench.py                       # the full run, as in docs/performance.md
    python bench.py --clients 1000 --rounds 2 --skip-feeds   # a quick look
    python bench.py --json bench.json     # also write the figures as JSON
    python bench.py --compare             # green threads vs OS threads vs Tornado, parked clients
    python bench.py --scale-out 1 2 4 8   # one process in memory, then 1, 2, 4, 8 sharing Redis
    python bench.py --busy 3000 --compare # a busy room: clients re-polling, posts arriving, servers in turns
    python bench.py --websub              # a WebSub hub's push to parked clients of the feed stream
"""

import argparse
import collections
import http.client
import http.server
import json
import multiprocessing
import os
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


class App:
    """longpoll.py in its own process."""

    def __init__(self, *flags, db=None, script=None, tuning=None):
        self.folder = tempfile.TemporaryDirectory(prefix="longpoll-bench-")
        if script:                  # one of examples/, which takes --port and --poll-timeout
            command = [str(HERE / "examples" / script), *flags]
        else:
            if not any(f.startswith("--feed") for f in flags):
                flags += ("--feeds", os.devnull)     # no public feeds: all traffic stays on loopback
            # As by default, a database file (in a folder of its own), unless db=":memory:".
            flags += ("--db", db or os.path.join(self.folder.name, "longpoll.db"))
            command = [str(HERE / "longpoll.py"), *flags]
            if tuning:              # (name, value) of wakeup.py, for --wake-slice and --answer-rate
                command = ["-c", "import sys, longpoll, wakeup; name, value = sys.argv.pop(1), sys.argv.pop(1); "
                                 "setattr(wakeup, name, type(getattr(wakeup, name))(value)); "
                                 "longpoll.main(sys.argv[1:])", *map(str, tuning), *flags]
        self.proc = subprocess.Popen(
            [sys.executable, *command, *(() if "--port" in flags else ("--port", "0"))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        match = re.search(r"http://([\d.]+):(\d+)/", self.proc.stdout.readline())
        if not match:
            raise SystemExit(f"longpoll.py did not start: {self.proc.stderr.read()}")
        self.host, self.port = match[1], int(match[2])

    def request(self, method, path, body=None):
        # Long: a server of 10,000 OS threads can take over a minute to get to a request.
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body and json.dumps(body), headers=headers)
        resp = conn.getresponse()
        data = json.loads(resp.read())
        conn.close()
        return resp.status, data

    def status(self):
        return self.request("GET", "/status")[1]

    def rss(self):
        """Resident memory, bytes."""
        with open(f"/proc/{self.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def address_space(self):
        """Virtual memory reserved, bytes: what a thread's stack claims, touched or not."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmSize:\s*(\d+)", f.read())[1]) * 1024

    def cpu(self):
        """User + system CPU seconds so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def settle(self, still=0.1):
        """Wait until the server has used no CPU for `still` seconds."""
        before = self.cpu()
        while True:
            time.sleep(still)
            now = self.cpu()
            if now == before:
                return
            before = now

    def wait_until(self, predicate, timeout, what, every=0.05):
        deadline = time.monotonic() + timeout
        while not predicate(self.status()):
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}: {self.status()}")
            time.sleep(every)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.folder.cleanup()


class Client:
    """One keep-alive connection that long-polls; buffers until a whole response is in."""

    __slots__ = ("sock", "buf", "cursor", "answered_at", "body")

    def __init__(self, sock):
        self.sock, self.buf, self.cursor, self.answered_at, self.body = sock, b"", None, None, None

    def poll(self, path, cursor, query=b""):
        self.cursor = cursor
        self.sock.send(b"GET %s?cursor=%d%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % (path, cursor, query))

    def feed(self, data):
        """Add received bytes; return True when a whole response has arrived."""
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])
        if len(rest) < length:
            return False
        self.body, self.buf = rest[:length], rest[length:]
        if not head.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(f"bad answer: {head[:60]!r}")
        return True


def loopback(n):
    """The n-th address in 127.1.0.0/16: clients come from many addresses, as real
    browsers do (the server caps the polls one address may park)."""
    return f"127.1.{n >> 8 & 255}.{n & 255}"


def connect(apps, n):
    """n clients, dealt round the app processes (one App, or a list of them)."""
    apps = apps if isinstance(apps, list) else [apps]
    clients = []
    for i in range(n):
        app = apps[i % len(apps)]
        sock = socket.create_connection((app.host, app.port), source_address=(loopback(i), 0))
        sock.setblocking(False)
        clients.append(Client(sock))
    return clients


def watch(clients):
    """A selector over the clients' sockets, each registered with its Client."""
    sel = selectors.DefaultSelector()
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ, c)
    return sel


def answers(sel, n, expected):
    """Read until n clients have an answer (60 s at most), noting when each came;
    return how many answers were not expected(body), or never came."""
    waiting, errors = n, 0
    deadline = time.monotonic() + 60
    while waiting and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1):
            c = key.data
            if c.feed(c.sock.recv(65536)):
                c.answered_at = time.perf_counter()
                waiting -= 1
                errors += not expected(json.loads(c.body))
    return errors + waiting


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def post_with_buckets(app, n, samples=200):
    """POST latency with no flood-control buckets held, and with n addresses holding
    partly used ones (a flood spread over many addresses, via a trusted proxy)."""
    client = Client(socket.create_connection((app.host, app.port)))

    def requests(first, count):
        return b"".join(
            b"POST /chat/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"X-Forwarded-For: 10.%d.%d.%d\r\nContent-Length: 12\r\n\r\n{\"body\":\"x\"}"
            % (i >> 16 & 255, i >> 8 & 255, i & 255) for i in range(first, first + count))

    def answers(count):
        for _ in range(count):
            complete = client.feed(b"")         # pipelined answers may already be in
            while not complete:
                complete = client.feed(client.sock.recv(65536))

    def timed(first):
        times = []
        for i in range(first, first + samples):
            start = time.perf_counter()
            client.sock.sendall(requests(i, 1))
            answers(1)
            times.append((time.perf_counter() - start) * 1000)
        return times

    before = timed(n + samples)             # addresses of their own, not yet in the table
    for first in range(0, n, 500):          # fill the table, 500 pipelined posts at a time
        client.sock.sendall(requests(first, min(500, n - first)))
        answers(min(500, n - first))
    after = timed(n + 2 * samples)
    client.sock.close()
    return {"buckets": n, "post_ms_empty_p50": statistics.median(before),
            "post_ms_p50": statistics.median(after), "post_ms_p99": percentile(after, 99)}


def fan_out(apps, n, rounds, present=False):
    """N parked clients dealt round the processes (one App, or a list sharing Redis),
    one message posted to the first, time until each has it; memory per parked client."""
    apps = apps if isinstance(apps, list) else [apps]
    app = apps[0]

    def total(measure):
        return sum(measure(a) for a in apps)

    def full_collections():
        """Generation-2 garbage collections so far in the servers that tell (/status), or None."""
        counts = [a.status().get("collections") for a in apps]
        return None if None in counts else sum(c[2] for c in counts)
    idle_rss, idle_vm = total(App.rss), total(App.address_space)
    clients = connect(apps, n)
    sel = watch(clients)
    results = []
    for _ in range(rounds):
        cursor = app.status()["streams"]["chat"]["last_id"]
        gc_before, cpu_before = full_collections(), total(App.cpu)
        parking = time.perf_counter()
        for i, c in enumerate(clients):
            c.answered_at = None
            # With present, each client is a browser saying who it is, as the chat page's polls do.
            c.poll(b"/chat/updates", cursor, b"&browser=bench-%06d&nick=n%d" % (i, i) if present else b"")
        for i, a in enumerate(apps):
            share = len(range(i, n, len(apps)))
            a.wait_until(lambda s: s["streams"]["chat"]["waiting"] == share, 120, f"{share} parked polls")
        park_s = time.perf_counter() - parking
        early = sum(1 for key, _ in sel.select(timeout=0.2))   # anything answered before the post is wrong
        parked_rss, parked_vm = total(App.rss), total(App.address_space)
        gc_parked, cpu_parked = full_collections(), total(App.cpu)
        start = time.perf_counter()
        status, message = app.request("POST", "/chat/messages", {"nick": "bench", "body": "fan-out"})
        post_ms = (time.perf_counter() - start) * 1000
        errors = early + (status != 201) + answers(sel, n, lambda body: body["messages"] == [message])
        # CPU per client: user + system time of the server processes over the
        # phase, which a busy box moves far less than it moves latencies. Taken
        # once they are idle, so that the work a wave leaves after its last
        # answer (each poll going back to reading its connection) counts too.
        for a in apps:
            a.settle()
        cpu_answered, gc_answered = total(App.cpu), full_collections()
        latencies = [(c.answered_at - start) * 1000 for c in clients if c.answered_at]
        results.append({
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies), "post_ms": post_ms, "errors": errors, "park_s": park_s,
            "kb_per_client": (parked_rss - idle_rss) / n / 1024,
            "vm_kb_per_client": (parked_vm - idle_vm) / n / 1024,
            "park_cpu_us": (cpu_parked - cpu_before) / n * 1e6, "answer_cpu_us": (cpu_answered - cpu_parked) / n * 1e6,
            "full_gc_parking": None if gc_before is None else gc_parked - gc_before,
            "full_gc_fan_out": None if gc_before is None else gc_answered - gc_parked})
    for c in clients:
        c.sock.close()
    sel.close()
    for a in apps:
        a.wait_until(lambda s: s["waiting"] == 0, 60, "clients to leave")
    return summary(n, len(apps), results)


def summary(n, processes, results):
    """Rounds of fan_out(), with the median of each figure and the errors of all."""
    return {"clients": n, "processes": processes, "rounds": results,
            **{k: statistics.median(r[k] for r in results) for k in results[0] if results[0][k] is not None},
            "errors": sum(r["errors"] for r in results)}


def push_delivery(n, rounds):
    """A WebSub hub's push of one new entry, to n clients parked on the feed stream:
    the time from the hub's POST until each client has the entry. The hub and
    the feed server are the tests' own (conftest.py), on loopback."""
    from conftest import FeedServer, Hub, hubbed, numbered
    feeds, hub = FeedServer(), Hub()
    topic = feeds.feed("/feed.xml", hubbed(numbered(1, 1), hub.url))
    port = free_port()
    app = App("--port", str(port), "--public-url", f"http://127.0.0.1:{port}", "--feed", topic,
              "--feed-interval", "300", "--poll-timeout", "120", db=":memory:")
    try:
        app.wait_until(lambda s: s["feeds"][0]["push"]["state"] == "pushed", 30, "the hub's verification")
        clients = connect(app, n)
        sel = watch(clients)
        results = []
        for r in range(rounds):
            cursor = app.status()["streams"]["feed"]["last_id"]
            for c in clients:
                c.answered_at = None
                c.poll(b"/feed/updates", cursor)
            app.wait_until(lambda s: s["streams"]["feed"]["waiting"] == n, 120, f"{n} parked polls")
            cpu_parked = app.cpu()
            # The hub pushes the whole feed, as real hubs do: one entry in it is new.
            pushing = threading.Thread(target=hub.push, args=(topic, hubbed(numbered(1, r + 2), hub.url)))
            start = time.perf_counter()
            pushing.start()
            errors = answers(sel, n, lambda body: [e["title"] for e in body["entries"]] == [f"Entry {r + 2}"])
            pushing.join()
            latencies = [(c.answered_at - start) * 1000 for c in clients if c.answered_at]
            results.append({"p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
                            "max_ms": max(latencies), "errors": errors,
                            "answer_cpu_us": (app.cpu() - cpu_parked) / n * 1e6})
        for c in clients:
            c.sock.close()
        sel.close()
    finally:
        app.stop()
        hub.close()
        feeds.close()
    w = {"clients": n, "rounds": results, **{k: statistics.median(r[k] for r in results) for k in results[0]},
         "errors": sum(r["errors"] for r in results)}
    print(f"WebSub push to {n} parked clients: p50 {w['p50_ms']:.1f} ms, p99 {w['p99_ms']:.1f} ms, "
          f"max {w['max_ms']:.1f} ms, {w['answer_cpu_us']:.0f} us server CPU a client, errors {w['errors']}", flush=True)
    return w


def presence_cost(n, rounds):
    """What presence costs: fan-out to n parked chat polls without and with browser
    ids (a fresh process each), then n browsers joining at once while n clients
    watch /presence/updates: server CPU, and how many snapshots were published."""
    report = {}
    for present in (False, True):
        app = App(db=":memory:")
        try:
            report["present" if present else "anonymous"] = fan_out(app, n, rounds, present=present)
        finally:
            app.stop()
    app = App("--presence-grace", "60", db=":memory:")
    try:
        # The joins are pipelined, ten browsers to a connection: open files are not enough for 2 n.
        watchers, joiners = connect(app, n), connect(app, -(-n // 10))
        sel = watch(watchers)
        cursor = app.request("GET", "/presence")[1]["cursor"]
        for c in watchers:
            c.sock.send(b"GET /presence/updates?cursor=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % cursor)
        app.wait_until(lambda s: s["streams"]["presence"]["waiting"] == n, 120, f"{n} watchers parked")
        published, cpu = app.status()["streams"]["presence"]["last_id"], app.cpu()
        start = time.perf_counter()
        for i, c in enumerate(joiners):         # one chat poll per browser, answered at once: a join
            c.sock.send(b"".join(b"GET /chat/updates?browser=join-%06d HTTP/1.1\r\nHost: localhost\r\n\r\n" % b
                                 for b in range(i * 10, min(n, i * 10 + 10))))
        errors = answers(sel, n, lambda body: body["count"] > 0)
        app.wait_until(lambda s: app.request("GET", "/presence")[1]["count"] == n, 60, f"{n} browsers present")
        report["joins"] = {"browsers": n, "watchers": n, "server_cpu_s": app.cpu() - cpu,
                           "snapshots": app.status()["streams"]["presence"]["last_id"] - published,
                           "all_present_s": time.perf_counter() - start, "errors": errors}
        for c in watchers + joiners:
            c.sock.close()
        sel.close()
    finally:
        app.stop()
    for kind in ("anonymous", "present"):
        f = report[kind]
        print(f"{f['clients']} parked chat polls, {kind}: park {f['park_cpu_us']:.0f} us and answer "
              f"{f['answer_cpu_us']:.0f} us of server CPU a poll, {f['kb_per_client']:.1f} KB a client, "
              f"fan-out p99 {f['p99_ms']:.0f} ms, errors {f['errors']}", flush=True)
    j = report["joins"]
    print(f"{j['browsers']} browsers joining while {j['watchers']} watch: {j['server_cpu_s']:.2f} s of server CPU, "
          f"{j['snapshots']} snapshots published, all present after {j['all_present_s']:.1f} s, "
          f"errors {j['errors']}", flush=True)
    return report


def write_alone(name, figures, json_file):
    """The report of a run made alone (--presence, --websub), to FILE if asked."""
    if json_file:
        Path(json_file).write_text(json.dumps({"machine": f"{os.cpu_count()} cores, {platform()}", name: figures},
                                              indent=2))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throughput(app, n, posters, seconds):
    """N clients re-polling as answers come, posters posting flat out."""
    clients = connect(app, n)
    sel = selectors.DefaultSelector()
    cursor = app.status()["streams"]["chat"]["last_id"]
    for c in clients:
        sel.register(c.sock, selectors.EVENT_READ, c)
        c.poll(b"/chat/updates", cursor)
    app.wait_until(lambda s: s["streams"]["chat"]["waiting"] == n, 60, "parked polls")
    post = json.dumps({"nick": "bench", "body": "throughput"}).encode()
    post_request = (b"POST /chat/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(post), post))
    writers = connect(app, posters)
    for w in writers:
        sel.register(w.sock, selectors.EVENT_READ, w)
        w.sock.send(post_request)
    posted = delivered = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=0.5):
            c = key.data
            if not c.feed(c.sock.recv(262144)):
                continue
            if c in writers:
                posted += 1
                c.sock.send(post_request)
            else:
                batch = json.loads(c.body)
                delivered += len(batch["messages"])
                errors += batch.get("gap", False)
                c.poll(b"/chat/updates", batch["cursor"])
    for c in clients + writers:
        c.sock.close()
    sel.close()
    return {"clients": n, "posters": posters, "seconds": seconds,
            "posted_per_s": posted / seconds, "delivered_per_s": delivered / seconds, "gaps": errors}


def posting_alone(posters, seconds, *flags, db=None):
    """Messages a second that `posters` connections post flat out, flood control opened."""
    app = App("--post-rate", "1000000", "--post-burst", "1000000", *flags, db=db)
    try:
        app.wait_until(lambda s: s["storage"]["ok"], 30, "the store (with --redis, the connection)")
        return throughput(app, 0, posters, seconds)["posted_per_s"]
    finally:
        app.stop()


def busy_clients(targets, first, count, cursor, pipe):
    """One process of the busy room's load generator: clients first to first+count-1,
    dealt round the targets ((host, port) of each server process), re-polling the
    moment they are answered, until the parent says stop. Sends back how long
    each message took to arrive (the sender's time.monotonic() is its body)."""
    clients = []
    for i in range(first, first + count):
        sock = socket.create_connection(targets[i % len(targets)], source_address=(loopback(i), 0))
        sock.setblocking(False)
        clients.append(Client(sock))
    sel = watch(clients)
    for c in clients:
        c.poll(b"/chat/updates", cursor)
    pipe.send("polling")
    latencies, errors, answered = [], 0, 0
    cpu, wall = time.process_time(), time.monotonic()
    while not pipe.poll():
        for key, _ in sel.select(timeout=0.05):
            c = key.data
            try:
                data = c.sock.recv(262144)
                if not data:
                    raise ConnectionError("closed by the server")
                if not c.feed(data):
                    continue
                batch = json.loads(c.body)
                now = time.monotonic()
                latencies.extend(now - float(m["body"]) for m in batch["messages"])
                answered += 1
                c.poll(b"/chat/updates", batch["cursor"])
            except (OSError, RuntimeError, ValueError):
                errors += 1
                sel.unregister(c.sock)
    pipe.recv()
    # How busy this process was: near 100 %, the load generator, not the server, sets the pace.
    pipe.send((latencies, errors, answered, (time.process_time() - cpu) / (time.monotonic() - wall)))
    for c in clients:
        c.sock.close()


def busy(apps, n, rate, posters, seconds, generators, drain=1.0):
    """A busy room: n clients re-polling without pause (dealt over `generators`
    processes and round the server processes), `rate` posts a second from
    `posters` keep-alive connections for `seconds`. Deliveries are counted until
    `drain` seconds after the last post's answer."""
    apps = apps if isinstance(apps, list) else [apps]
    targets = [(a.host, a.port) for a in apps]
    cursor = apps[0].status()["streams"]["chat"]["last_id"]
    fork = multiprocessing.get_context("fork")
    workers, per = [], -(-n // generators)
    for first in range(0, n, per):
        ours, theirs = fork.Pipe()
        proc = fork.Process(target=busy_clients, args=(targets, first, min(per, n - first), cursor, theirs),
                            daemon=True)
        proc.start()
        workers.append((proc, ours))
    for _, pipe in workers:
        pipe.recv()
    for i, a in enumerate(apps):
        share = len(range(i, n, len(apps)))
        a.wait_until(lambda s: s["streams"]["chat"]["waiting"] == share, 120, f"{share} parked polls")
    sel, free, pending = selectors.DefaultSelector(), [], {}    # pending: poster -> when its post was due
    for k in range(posters):        # each poster from an address of its own, dealt round the processes
        c = Client(socket.create_connection(targets[k % len(targets)], source_address=(loopback(65000 + k), 0)))
        sel.register(c.sock, selectors.EVENT_READ, c)
        free.append(c)
    post_ms = []
    cpu_before = sum(a.cpu() for a in apps)
    start = time.monotonic()
    due = collections.deque(start + k / rate for k in range(round(seconds * rate)))
    while due or pending:
        now = time.monotonic()
        while due and due[0] <= now and free:
            c = free.pop()
            pending[c] = due.popleft()
            body = json.dumps({"nick": "bench", "body": f"{time.monotonic():.6f}"}).encode()
            c.sock.sendall(b"POST /chat/messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        for key, _ in sel.select(timeout=max(0, min(0.05, due[0] - now)) if due and free else 0.05):
            c = key.data
            if c.feed(c.sock.recv(65536)):
                # From when the post was due, not sent: a post queued behind a slow one waited too.
                post_ms.append((time.monotonic() - pending.pop(c)) * 1000)
                free.append(c)
    time.sleep(drain)
    cpu = sum(a.cpu() for a in apps) - cpu_before
    latencies, errors, answered, busiest = [], 0, 0, 0
    for proc, pipe in workers:
        pipe.send("stop")
    for proc, pipe in workers:
        got, failed, answers_read, busy_share = pipe.recv()
        latencies += got
        errors += failed
        answered += answers_read
        busiest = max(busiest, busy_share)
        proc.join()
    for c in free:
        c.sock.close()
    sel.close()
    delivered, posted = len(latencies), len(post_ms)
    return {"clients": n, "processes": len(apps), "generators": len(workers), "rate": rate, "seconds": seconds,
            "posted": posted, "delivered_per_s": delivered / seconds, "delivered_share": delivered / (posted * n),
            "cpu_us_per_delivered": cpu / max(1, delivered) * 1e6,
            "delivery_p50_ms": percentile(latencies, 50) * 1000, "delivery_p99_ms": percentile(latencies, 99) * 1000,
            "post_p50_ms": percentile(post_ms, 50), "post_p99_ms": percentile(post_ms, 99),
            "messages_per_answer": delivered / max(1, answered), "generator_busy": busiest, "errors": errors}


def in_turns(servers, sizes, rounds, measure, line):
    """measure(app, n) of each server (name, how App starts it) at each size, each
    round a fresh process of each, in turn: a box whose speed drifts during the
    run (a shared one does) moves them all alike. Prints line(result) as each
    comes; returns {(name, n): [the result of each round]}."""
    done = {(name, n): [] for name, _ in servers for n in sizes}
    for _ in range(rounds):
        for name, how in servers:
            for n in sizes:
                how = dict(how)
                # A long poll timeout, so that a server slow to park N polls still has them all parked at once.
                app = App(*how.pop("flags", ("--poll-timeout", "120")), **how)
                try:
                    r = measure(app, n)
                except SystemExit as e:     # a server that cannot park them all in time: said, and on to the next
                    print(f"{name}, {n} clients: {e}", flush=True)
                    continue
                finally:
                    app.stop()
                done[name, n].append(r)
                print(f"{name}, {n} clients: {line(r)}", flush=True)
    return done


def busy_rooms(sizes, rounds, rate, posters, seconds, generators, compare, tunings, json_file):
    """The busy room on longpoll.py (once with each (name, value) of wakeup.py asked
    for) and, with compare, on the servers of examples/: each round a fresh process of each, in turn."""
    flags = ("--poll-timeout", "120", "--post-rate", "1000000", "--post-burst", "1000000")
    servers = [(f"longpoll.py, {t[0]} {t[1]:g}" if t else "longpoll.py",
                {"flags": flags, "db": ":memory:", "tuning": t}) for t in tunings or [None]]
    if compare:
        servers += compared_servers()[1:]
    done = in_turns(servers, sizes, rounds, lambda app, n: busy(app, n, rate, posters, seconds, generators),
                    lambda r: f"{r['delivered_per_s']:,.0f} delivered/s ({100 * r['delivered_share']:.1f} %), "
                              f"{r['cpu_us_per_delivered']:.0f} us CPU a message, delivery p50/p99 "
                              f"{r['delivery_p50_ms']:,.0f}/{r['delivery_p99_ms']:,.0f} ms, POST p50/p99 "
                              f"{r['post_p50_ms']:,.1f}/{r['post_p99_ms']:,.1f} ms, {r['messages_per_answer']:.1f} "
                              f"messages an answer, busiest generator process {100 * r['generator_busy']:.0f} %, "
                              f"errors {r['errors']}")
    rows = [{"server": name, **busy_summary(results)} for (name, n), results in done.items() if results]
    print(f"\nMachine: {os.cpu_count()} cores, {platform()}; server and load generator ({generators} processes) "
          f"on the same box. {rate:g} posts/s from {posters} posters for {seconds:g} s; medians of {rounds} rounds.\n")
    print_busy(rows, "server")
    if json_file:
        Path(json_file).write_text(json.dumps({"machine": platform(), "busy": rows}, indent=2))


def busy_summary(results):
    """Rounds of busy(), with the median of each figure and the errors of all."""
    return {**{k: statistics.median(r[k] for r in results) for k in results[0]}, "clients": results[0]["clients"],
            "errors": sum(r["errors"] for r in results), "rounds": results}


def print_busy(rows, first):
    print(f"| {first} | clients | delivered a second | share delivered | server CPU per delivered message "
          "| delivery p50 / p99 | POST p50 / p99 | messages an answer | busiest generator process | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[first]} | {r['clients']:,} | {r['delivered_per_s']:,.0f} | {100 * r['delivered_share']:.1f} % | "
              f"{r['cpu_us_per_delivered']:.0f} µs | {r['delivery_p50_ms']:,.0f} / {r['delivery_p99_ms']:,.0f} ms | "
              f"{r['post_p50_ms']:,.1f} / {r['post_p99_ms']:,.1f} ms | {r['messages_per_answer']:.1f} | "
              f"{100 * r['generator_busy']:.0f} % | {r['errors']} |")


class FeedFarm:
    """n small Atom feeds on a local server that answers 304 when the ETag matches."""

    def __init__(self, n):
        entries = "".join(f"<entry><id>urn:{i}</id><title>Entry {i}</title><link href='http://example.com/{i}'/>"
                          f"<updated>2026-11-01T10:00:00Z</updated><summary>Summary {i}</summary></entry>"
                          for i in range(10))
        body = (f"<?xml version='1.0'?><feed xmlns='http://www.w3.org/2005/Atom'><title>Farm</title>"
                f"<id>urn:farm</id><updated>2026-11-01T10:00:00Z</updated>{entries}</feed>").encode()
        counts = self.counts = {"200": 0, "304": 0}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                if self.headers.get("If-None-Match") == '"v1"':
                    counts["304"] += 1
                    self.send_response(304)
                    self.send_header("ETag", '"v1"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                counts["200"] += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/atom+xml")
                self.send_header("ETag", '"v1"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        port = self.httpd.server_address[1]
        self.file = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        self.file.write("".join(f"http://127.0.0.1:{port}/feed/{i}\n" for i in range(n)))
        self.file.close()

    def close(self):
        self.httpd.shutdown()
        os.unlink(self.file.name)


def feed_scale(n, interval):
    farm = FeedFarm(n)
    app = App("--feeds", farm.file.name, "--feed-interval", str(interval))
    try:
        def checked_since(t):
            return lambda s: all(f["last_checked"] and f["last_checked"] > t for f in s["feeds"])
        started = time.time()
        app.wait_until(checked_since(started - 1), 120, "the first cycle", every=0.5)
        first = [f["last_checked"] for f in app.status()["feeds"]]
        # Count the CPU of the second cycle only: start just before it, and ask
        # /status (500 feeds' worth of JSON) seldom.
        time.sleep(max(0, min(first) + interval - time.time() - 0.5))
        cpu_before = app.cpu()
        app.wait_until(checked_since(max(first)), interval + 120, "the second cycle", every=0.5)
        second = [f["last_checked"] for f in app.status()["feeds"]]
        cpu = app.cpu() - cpu_before
        return {"feeds": n, "first_cycle_s": max(first) - started,
                "unchanged_cycle_s": max(second) - min(second), "unchanged_cycle_cpu_s": cpu,
                "answers": dict(farm.counts), "failing": sum(not f["ok"] for f in app.status()["feeds"])}
    finally:
        app.stop()
        farm.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+",
                   help="parked clients for each fan-out run (default: 1000 5000 10000)")
    p.add_argument("--rounds", type=int, default=5, help="fan-out rounds per client count (default: 5)")
    p.add_argument("--throughput-clients", type=int, default=1000, help="re-polling clients (default: 1000)")
    p.add_argument("--posters", type=int, default=4, help="connections posting flat out (default: 4)")
    p.add_argument("--seconds", type=float, default=10, help="length of the throughput run (default: 10)")
    p.add_argument("--feeds", type=int, default=500, help="feeds for the feed-scale run (default: 500)")
    p.add_argument("--skip-feeds", action="store_true", help="leave out the feed-scale run")
    p.add_argument("--buckets", type=int, default=100000,
                   help="addresses holding flood-control buckets for the POST timing (default: 100000; 0 skips)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--compare", type=int, nargs="*", metavar="N",
                   help="instead of the above: park N clients (default: 2000 10000) on the app's green "
                        "threads, on one OS thread per connection, and on Tornado if it is installed")
    p.add_argument("--scale-out", type=int, nargs="*", metavar="P",
                   help="instead of the above: fan-out and the busy room on one process in memory, then on P "
                        "processes sharing one Redis, for each P (default: 1 2), with --clients (default: 10000) "
                        "dealt round them")
    p.add_argument("--busy", type=int, nargs="*", metavar="N",
                   help="instead of the above: a busy room of N clients (default: 3000) re-polling the moment "
                        "they are answered while --rate posts a second arrive from --posters; with --compare, "
                        "the servers of examples/ take turns with longpoll.py")
    p.add_argument("--rate", type=float, default=5, help="posts a second in the busy room (default: 5)")
    p.add_argument("--generators", type=int, default=min(8, os.cpu_count()),
                   help="processes of the busy room's load generator, each with a slice of the clients "
                        "(default: the cores, 8 at most)")
    p.add_argument("--wake-slice", type=int, nargs="+", metavar="K", default=[],
                   help="with --busy: longpoll.py once with each WAKE_SLICE K (polls a publish wakes per turn "
                        "of the hub), in turns")
    p.add_argument("--answer-rate", type=float, nargs="+", metavar="R", default=[],
                   help="with --busy: longpoll.py once with each ANSWER_RATE R (answers a second the polls "
                        "share under load; inf: none held), in turns")
    p.add_argument("--presence", type=int, nargs="?", const=10000, metavar="N",
                   help="instead of the above: what presence costs per parked poll (N chat polls without and "
                        "with browser ids), and N browsers joining at once while N watch (default: 10000)")
    p.add_argument("--websub", type=int, nargs="*", metavar="N",
                   help="instead of the above: a WebSub push to N clients parked on the feed stream "
                        "(default: 1000), from the hub's POST to each client's answer")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.busy is not None:
        args.busy = args.busy or [3000]
    elif args.compare is not None:
        args.compare = args.compare or [2000, 10000]
    if args.scale_out is not None:
        args.scale_out = args.scale_out or [1, 2]
        args.clients = args.clients or [10000]
    args.clients = args.clients or [1000, 5000, 10000]
    most = max(args.busy or args.compare or args.clients)
    if most + 100 > hard:
        raise SystemExit(f"{most} clients need more open files than this machine's hard limit, {hard} "
                         "(ulimit -Hn); ask for fewer")
    if args.busy is not None:
        return busy_rooms(args.busy, args.rounds, args.rate, args.posters, args.seconds, args.generators,
                          args.compare is not None,
                          [("WAKE_SLICE", k) for k in args.wake_slice]
                          + [("ANSWER_RATE", r) for r in args.answer_rate],
                          args.json)
    if args.compare is not None:
        return compare(args.compare, args.rounds, args.json)
    if args.presence is not None:
        return write_alone("presence", presence_cost(args.presence, args.rounds), args.json)
    if args.websub is not None:
        return write_alone("websub", [push_delivery(n, args.rounds) for n in args.websub or [1000]], args.json)
    if args.scale_out is not None:
        return scale_out(args.scale_out, args.clients, args.rounds, args.rate, args.posters, args.seconds,
                         args.generators, args.json)
    report = {"machine": f"{os.cpu_count()} cores, {platform()}", "fan_out": []}

    for n in args.clients:
        app = App()         # default flags, and a fresh process: memory freed by a run before would flatter
        try:
            report["fan_out"].append(fan_out(app, n, args.rounds))
        finally:
            app.stop()
        r = report["fan_out"][-1]
        print(f"fan-out {n:>6} clients: p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"max {r['max_ms']:7.1f} ms  POST {r['post_ms']:5.1f} ms  "
              f"{r['kb_per_client']:5.1f} KB/client  errors {r['errors']}", flush=True)
    # Posting flat out from one address needs the flood control opened up.
    app = App("--post-rate", "1000000", "--post-burst", "1000000")
    try:
        report["throughput"] = t = throughput(app, args.throughput_clients, args.posters, args.seconds)
        print(f"throughput {t['clients']} clients, {t['posters']} posters: {t['posted_per_s']:.0f} posted/s, "
              f"{t['delivered_per_s']:.0f} delivered/s, gaps {t['gaps']}", flush=True)
    finally:
        app.stop()
    # Posting alone, flat out, with the database file and with :memory:, one after the other.
    report["posting"] = {mode: posting_alone(args.posters, args.seconds, db=db)
                         for mode, db in (("file", None), ("memory", ":memory:"))}
    p = report["posting"]
    print(f"posting, {args.posters} posters: {p['file']:.0f}/s with the database file, {p['memory']:.0f}/s "
          f"with :memory: ({100 * p['file'] / p['memory']:.0f} %)", flush=True)
    if args.buckets:
        # A slow refill keeps every address's bucket in the table for the whole run.
        app = App("--trusted-proxy", "127.0.0.1", "--post-rate", "0.001")
        try:
            report["buckets"] = b = post_with_buckets(app, args.buckets)
            print(f"POST with {b['buckets']} buckets: p50 {b['post_ms_p50']:.2f} ms, p99 {b['post_ms_p99']:.2f} ms "
                  f"(none held: p50 {b['post_ms_empty_p50']:.2f} ms)", flush=True)
        finally:
            app.stop()
    if not args.skip_feeds:
        report["feeds"] = f = feed_scale(args.feeds, interval=30)
        print(f"feeds {f['feeds']}: first cycle {f['first_cycle_s']:.1f} s, unchanged cycle "
              f"{f['unchanged_cycle_s']:.1f} s using {f['unchanged_cycle_cpu_s']:.2f} s CPU, "
              f"answers {f['answers']}, failing {f['failing']}", flush=True)
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def compared_servers():
    """The same long-poll contract on three kinds of server: (name, how App starts it)."""
    servers = [("eventlet green threads (longpoll.py)", {"db": ":memory:"}),
               ("one OS thread per connection (threaded_server.py)", {"script": "threaded_server.py"})]
    try:
        import tornado
        servers.append((f"Tornado {tornado.version} coroutines (tornado_server.py)", {"script": "tornado_server.py"}))
    except ImportError:
        print("tornado is not installed (pip install -r requirements-bench.txt): its row is left out")
    return servers


def compare(sizes, rounds, json_file):
    """The same long-poll contract on three kinds of server: each round a fresh process of each, in turn."""
    servers = compared_servers()
    done = in_turns(servers, sizes, rounds, lambda app, n: fan_out(app, n, 1)["rounds"][0],
                    lambda r: f"park {r['park_cpu_us']:.0f} µs, answer {r['answer_cpu_us']:.0f} µs of CPU a client, "
                              f"p99 {r['p99_ms']:.0f} ms, {r['kb_per_client']:.1f} KB/client, errors {r['errors']}")
    rows = [{"server": name, **summary(n, 1, results)} for (name, n), results in done.items() if results]
    print(f"\nMachine: {os.cpu_count()} cores, {platform()}; server and load generator on the same box.\n")
    print("| server | parked clients | memory per parked client (resident) | address space reserved "
          "per parked client | time to park them all | server CPU to park one | server CPU to answer one "
          "| full collections parking / fanning out | fan-out p50 | fan-out p99 | the POST | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        gc_counts = ("n/a" if r["rounds"][0]["full_gc_parking"] is None else
                     f"{sum(x['full_gc_parking'] for x in r['rounds'])} / {sum(x['full_gc_fan_out'] for x in r['rounds'])}")
        print(f"| {r['server']} | {r['clients']:,} | {r['kb_per_client']:.1f} KB | "
              f"{r['vm_kb_per_client']:,.0f} KB | {r['park_s']:.1f} s | {r['park_cpu_us']:.0f} µs | "
              f"{r['answer_cpu_us']:.0f} µs | {gc_counts} | {r['p50_ms']:,.0f} ms | "
              f"{r['p99_ms']:,.0f} ms | {r['post_ms']:.1f} ms | {r['errors']} |")
    if json_file:
        Path(json_file).write_text(json.dumps({"machine": platform(), "compare": rows}, indent=2))


class Redis:
    """Debian's redis-server on a free loopback port, keeping nothing on disk."""

    def __init__(self):
        if not shutil.which("redis-server"):
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(port), "PING"], capture_output=True).stdout != b"PONG\n":
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def scale_out(counts, sizes, rounds, rate, posters, seconds, generators, json_file):
    """For each number of processes sharing one Redis (and one process in memory
    beside them): fan-out to N parked clients dealt round the processes, then the
    busy room on the same processes; and posting alone, in memory and on Redis."""
    redis = Redis()
    setups = [("1 process, --db :memory:", 1, {"db": ":memory:"})]
    setups += [(f"{c} process{'es' if c > 1 else ''}, --redis", c, {"flags": ("--redis", redis.url)}) for c in counts]
    rows = []
    try:
        for n in sizes:
            for name, count, how in setups:
                fans, busies = [], []
                for _ in range(rounds):      # a fresh set of processes each round
                    apps = [App(*how.get("flags", ()), "--post-rate", "1000000", "--post-burst", "1000000",
                                db=how.get("db")) for _ in range(count)]
                    try:
                        for app in apps:
                            app.wait_until(lambda s: s["storage"]["ok"], 30, "the connection to Redis")
                        fans += fan_out(apps, n, 1)["rounds"]
                        busies.append(busy(apps, n, rate, posters, seconds, generators))
                    finally:
                        for app in apps:
                            app.stop()
                r = {"setup": name, **summary(n, count, fans),
                     "busy": busy_summary(busies)}
                rows.append(r)
                b = r["busy"]
                print(f"{name}, {n} clients: fan-out p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, "
                      f"{r['kb_per_client']:.1f} KB/client; busy: {b['delivered_per_s']:,.0f} delivered/s "
                      f"({100 * b['delivered_share']:.1f} %), POST p99 {b['post_p99_ms']:,.1f} ms, "
                      f"errors {r['errors'] + b['errors']}", flush=True)
        posting = {"memory": posting_alone(posters, seconds, db=":memory:"),
                   "redis": posting_alone(posters, seconds, "--redis", redis.url)}
    finally:
        redis.stop()
    print(f"\nMachine: {os.cpu_count()} cores, {platform()}; server processes, Redis and load generator "
          f"({generators} processes) on the same box; medians of {rounds} rounds.\n")
    print("| setup | parked clients | fan-out p50 | fan-out p99 | memory per parked client | busy room: delivered "
          "a second | share delivered | delivery p99 | POST p99 | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r["busy"]
        print(f"| {r['setup']} | {r['clients']:,} | {r['p50_ms']:,.0f} ms | {r['p99_ms']:,.0f} ms | "
              f"{r['kb_per_client']:.1f} KB | {b['delivered_per_s']:,.0f} | {100 * b['delivered_share']:.1f} % | "
              f"{b['delivery_p99_ms']:,.0f} ms | {b['post_p99_ms']:,.1f} ms | {r['errors'] + b['errors']} |")
    print(f"\nBusy room: {rate:g} posts/s from {posters} posters for {seconds:g} s, every client re-polling at once.")
    print(f"Posting alone, one process, {posters} posters: {posting['memory']:,.0f} messages/s in memory, "
          f"{posting['redis']:,.0f}/s through Redis ({100 * posting['redis'] / posting['memory']:.0f} %).")
    if json_file:
        Path(json_file).write_text(json.dumps({"machine": platform(), "scale_out": rows, "posting": posting},
                                              indent=2))


def platform():
    with open("/proc/cpuinfo") as f:
        model = re.search(r"model name\s*:\s*(.*)", f.read())
    return f"{model[1] if model else 'unknown CPU'}, Python {sys.version.split()[0]}"


def print_table(report):
    print(f"\nMachine: {report['machine']}; server and load generator on the same box.\n")
    print("| clients | p50 ms | p99 ms | max ms | POST ms | KB/client | errors |")
    print("|--------:|-------:|-------:|-------:|--------:|----------:|-------:|")
    for r in report["fan_out"]:
        print(f"| {r['clients']:,} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} | "
              f"{r['post_ms']:.1f} | {r['kb_per_client']:.1f} | {r['errors']} |")
    t = report["throughput"]
    print(f"\nThroughput ({t['clients']:,} clients, {t['posters']} posters, {t['seconds']:g} s): "
          f"{t['posted_per_s']:,.0f} messages posted/s, {t['delivered_per_s']:,.0f} delivered/s.")
    p = report["posting"]
    print(f"Posting alone ({t['posters']} posters): {p['file']:,.0f} messages/s with the database file, "
          f"{p['memory']:,.0f}/s with --db :memory: ({100 * p['file'] / p['memory']:.0f} %).")
    if "buckets" in report:
        b = report["buckets"]
        print(f"POST with {b['buckets']:,} addresses holding flood-control buckets: p50 {b['post_ms_p50']:.2f} ms, "
              f"p99 {b['post_ms_p99']:.2f} ms (none held: p50 {b['post_ms_empty_p50']:.2f} ms).")
    if "feeds" in report:
        f = report["feeds"]
        print(f"Feeds ({f['feeds']}): unchanged cycle {f['unchanged_cycle_s']:.1f} s, "
              f"{f['unchanged_cycle_cpu_s']:.2f} s CPU.")


if __name__ == "__main__":
    main()
