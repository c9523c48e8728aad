"""/metrics: what longpoll.py is doing, in Prometheus's text format, for a
Prometheus server to scrape.

Its role: count what happens on the hot paths with plain integers (answers,
publishes, gaps, refusals: a dictionary increment each, so a parked poll costs
no more), time the fan-out waves and the POSTs in histograms, and read the
rest of the state only when scraped, through a collector: the parked polls of
each stream, the store's health, each feed's last fetch, the WebSub
subscriptions.

What it may use: prometheus_client, bottle, storage's errors, and the objects
longpoll.py hands to watch(). It does not import longpoll (longpoll imports
it), and it changes nothing it reads. Its one route is on an app of its own,
which longpoll.py merges into its own.
"""

import argparse
import collections
import functools
import ipaddress
import time

import bottle
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import storage

registry = CollectorRegistry()
ProcessCollector(registry=registry)         # the process's CPU, memory and open files
app = bottle.Bottle()

answers = collections.Counter()             # stream key -> polls answered
gaps = collections.Counter()                # stream key -> answers that told of a gap
published = collections.Counter()           # stream key -> items added
errors = collections.Counter()              # HTTP status -> error answers (429, 503, ...)

WAVES = Histogram("longpoll_fanout_wave_seconds",
                  "Time from a publish until every poll parked on it was woken (waves with waiters only)",
                  buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=registry)
POSTS = Histogram("longpoll_post_seconds", "Time to handle POST /chat/messages, from its handler's start",
                  buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1), registry=registry)

watched = None      # watch() fills it


def watch(streams, store, feeds, client_address, readers):
    """What the collector reads at scrape time (longpoll's own dict of streams and
    list of feeds, filled or not yet), and who may read /metrics: clients whose
    address (client_address(), which believes only trusted proxies) is loopback
    or in readers (ip networks: --trusted-proxy and --metrics-from)."""
    global watched
    networks = []
    for reader in readers:
        try:
            networks.append(ipaddress.ip_network(reader, strict=False))
        except ValueError:
            pass            # a --trusted-proxy that is not an address is no client of /metrics
    watched = {"streams": streams, "store": store, "feeds": feeds, "client_address": client_address,
               "readers": networks}


def network(text):
    """An address or a network (10.0.0.0/8), for --metrics-from."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address or network: {text}") from None


def answered(key, gap):
    answers[key] += 1
    if gap:
        gaps[key] += 1


def error(status):
    errors[status] += 1


def wave(seconds):
    WAVES.observe(seconds)


def timed_post(handler):
    """A route handler, with its time in the POST histogram (refusals included)."""
    @functools.wraps(handler)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return handler(*args, **kwargs)
        finally:
            POSTS.observe(time.perf_counter() - start)
    return timed


@app.get("/metrics")
def scrape():
    address = watched["client_address"]()
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if not (ip and (ip.is_loopback or any(ip in n for n in watched["readers"]))):
        # Who reads and posts where, and how much: not for everyone.
        raise bottle.HTTPError(403, "/metrics is for loopback clients and --trusted-proxy; "
                                    "start the server with --metrics-from ADDRESS to let others read it")
    bottle.response.content_type = CONTENT_TYPE_LATEST
    bottle.response.set_header("Cache-Control", "no-store")
    return generate_latest(registry)


class State:
    """The state longpoll.py keeps anyway, read when scraped."""

    def collect(self):
        streams, store, feeds = watched["streams"], watched["store"], watched["feeds"]
        parked = GaugeMetricFamily("longpoll_parked_polls", "Long polls parked now, waiting for news",
                                   labels=["stream"])
        counted = {name: CounterMetricFamily(f"longpoll_{name}", doc, labels=["stream"]) for name, doc in (
            ("answers", "Polls of /chat/updates and /feed/updates answered"), ("gaps_answered", "Answers that told the client of a gap"),
            ("published", "Items added to the stream in this process (its own and, with --redis, others')"))}
        for name, s in streams.items():
            parked.add_metric([name], s.waiting)
            for family, counts in zip(counted.values(), (answers, gaps, published)):
                family.add_metric([name], counts[s.key])
        yield parked
        yield from counted.values()
        refused = CounterMetricFamily("longpoll_error_answers", "Error answers, by HTTP status (429: a limit, "
                                      "503: the store failing)", labels=["status"])
        for status in sorted(errors):
            refused.add_metric([str(status)], errors[status])
        yield refused
        health = store.status()
        yield GaugeMetricFamily("longpoll_store_up", "1 while the store (SQLite or Redis) works", health["ok"])
        up = GaugeMetricFamily("longpoll_feed_up", "1 if the feed's last check succeeded", labels=["feed"])
        checked = GaugeMetricFamily("longpoll_feed_last_checked_timestamp_seconds",
                                    "When the feed was last checked", labels=["feed"])
        entries = CounterMetricFamily("longpoll_feed_entries", "Entries published from the feed",
                                      labels=["feed"])
        for feed in feeds:
            up.add_metric([feed.url], feed.ok)
            checked.add_metric([feed.url], feed.last_checked or 0)
            entries.add_metric([feed.url], feed.entries)
        yield from (up, checked, entries)
        states = GaugeMetricFamily("longpoll_websub_subscriptions",
                                   "WebSub subscriptions, by state (new, requested, verified, refused, denied)",
                                   labels=["state"])
        try:
            counts = collections.Counter(sub.get("state") for sub in store.subscriptions().values())
        except storage.StoreError:
            counts = {}     # longpoll_store_up says why
        for state in sorted(counts, key=str):
            states.add_metric([str(state)], counts[state])
        yield states


registry.register(State())
