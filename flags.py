"""The command line: every flag, its check, and the limits the flags name.

parse_args() gives the settings that main() hands to each part of the app.
It uses only the standard library and metrics.network (for --metrics-from)."""

import argparse
import urllib.parse
import xml.etree.ElementTree
from pathlib import Path

import metrics

DEFAULT_FEEDS = [
    "https://news.ycombinator.com/rss",
    "https://feeds.bbci.co.uk/news/world/rss.xml",
    "https://blog.python.org/feeds/posts/default",
    "https://github.blog/feed/",
]
MAX_HISTORY = 10_000            # --history at most: every kept item is in memory, twice (fields and JSON)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="longpoll.py",
        description="A chat room and a live feed stream delivered by HTTP long polling.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=port_number, default=8080,
                   help="port to listen on (default: %(default)s; 0 picks a free one)")
    p.add_argument("--poll-timeout", type=positive, default=25.0, metavar="SECONDS",
                   help="how long a poll waits for news before answering empty (default: %(default)s)")
    p.add_argument("--history", type=history_size, default=200, metavar="N",
                   help=f"items kept per stream for clients that catch up (default: %(default)s; "
                        f"at most {MAX_HISTORY})")
    p.add_argument("--keep", type=count, default=10_000, metavar="N",
                   help="items the store keeps per stream, for the chat's past (GET /chat/messages); "
                        "at least --history (default: %(default)s)")
    p.add_argument("--db", default="longpoll.db", metavar="PATH",
                   help="SQLite file keeping the history, feed state and posted client_ids across "
                        "restarts (default: %(default)s; :memory: keeps nothing)")
    p.add_argument("--redis", metavar="URL",
                   help="share the chat, the feed and who is here with every process given the same Redis, e.g. "
                        "redis://127.0.0.1:6379/0; it keeps what --db keeps otherwise, and no file is opened")
    p.add_argument("--client-timeout", type=positive, default=30.0, metavar="SECONDS",
                   help="drop a client that takes longer than this to send a whole request (line, headers "
                        "and body), or idles that long between requests; a parked poll is not counted "
                        "(default: %(default)s)")
    p.add_argument("--connections-per-address", type=count, metavar="N",
                   help="connections one client address may hold open, whatever they are doing; more are "
                        "closed at once. Above --polls-per-address, so that an address with all its polls "
                        "parked can still post, load pages and hear its 429 (default: twice "
                        "--polls-per-address; a --trusted-proxy is not limited)")
    p.add_argument("--presence-grace", type=positive, default=10.0, metavar="SECONDS",
                   help="how long a browser stays present after its last chat poll ended "
                        "(default: %(default)s)")
    p.add_argument("--present-per-address", type=count, default=20, metavar="N",
                   help="browsers one client address may make present in who is here; more are served, "
                        "not counted (default: %(default)s)")
    p.add_argument("--post-rate", type=positive, default=2.0, metavar="PER_SECOND",
                   help="chat messages per second one client address may post over time (default: %(default)s)")
    p.add_argument("--post-burst", type=count, default=10, metavar="N",
                   help="messages one client address may post at once, before --post-rate applies "
                        "(default: %(default)s)")
    p.add_argument("--polls-per-address", type=count, default=1000, metavar="N",
                   help="long polls one client address may keep parked at once; more get 429 "
                        "(default: %(default)s, room for an office behind one NAT address)")
    p.add_argument("--trusted-proxy", action="append", default=[], metavar="ADDRESS",
                   help="a reverse proxy whose X-Forwarded-For, X-Forwarded-Host and X-Forwarded-Proto "
                        "are believed (repeatable)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a Host name answered when listening on a loopback address, beside localhost and "
                        "loopback addresses, which are always (repeatable)")
    p.add_argument("--feed", action="append", default=[], metavar="URL", type=http_url,
                   help="an Atom or RSS feed to poll (repeatable)")
    p.add_argument("--feeds", metavar="FILE",
                   help="a file of feed URLs, one per line with # comments, or an OPML export")
    p.add_argument("--feed-interval", type=at_least_one, default=300.0, metavar="SECONDS",
                   help="time between checks of each feed (default: %(default)s; at least 1)")
    p.add_argument("--fetch-timeout", type=positive, default=20.0, metavar="SECONDS",
                   help="longest one feed fetch may take, start to end (default: %(default)s)")
    p.add_argument("--public-url", type=http_url, metavar="URL",
                   help="where WebSub hubs reach this server, e.g. https://chat.example; with it, a feed "
                        "that names a hub is pushed within a second instead of polled (default: poll only)")
    p.add_argument("--hub", type=http_url, metavar="URL",
                   help="a WebSub hub to subscribe every feed through, such as Superfeedr's; user:password@ "
                        "in the URL is sent as HTTP Basic auth and never shown (needs --public-url)")
    p.add_argument("--metrics-from", action="append", default=[], metavar="ADDRESS", type=metrics.network,
                   help="an address or network (10.0.0.0/8) whose clients may read /metrics, beside loopback "
                        "clients and --trusted-proxy (repeatable)")
    p.add_argument("--access-log", action="store_true",
                   help="log every request to stderr (costly with thousands of clients)")
    args = p.parse_args(argv)
    if args.feeds:
        try:
            args.feed += read_feed_list(Path(args.feeds).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, xml.etree.ElementTree.ParseError) as e:
            p.error(f"--feeds {args.feeds}: {e}")
    elif not args.feed:
        args.feed = list(DEFAULT_FEEDS)
    if args.keep < args.history:
        p.error(f"--keep {args.keep} is below --history {args.history}: the store must keep at least "
                "what memory serves to catching-up polls")
    if args.connections_per_address is None:
        args.connections_per_address = 2 * args.polls_per_address
    elif args.connections_per_address <= args.polls_per_address:
        # Else the poll over the cap is closed unread, not told 429, and the address can post nothing.
        p.error(f"--connections-per-address {args.connections_per_address} must be above --polls-per-address "
                f"{args.polls_per_address}: the room between them is for the address's posts and pages")
    if args.hub and not args.public_url:
        p.error("--hub needs --public-url: the hub pushes to this server's public address")
    if args.public_url:
        args.public_url = args.public_url.rstrip("/")
    return args


def positive(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def at_least_one(text):
    value = float(text)
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def count(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def history_size(text):
    value = count(text)
    if value > MAX_HISTORY:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_HISTORY} (each item kept is held in memory), "
                                         f"not {text}")
    return value


def port_number(text):
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, not {text}")
    return value


def http_url(text):
    if urllib.parse.urlsplit(text).scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text}")
    return text


def read_feed_list(text):
    """Feed URLs from a plain list (one a line, # comments) or an OPML export."""
    if text.lstrip().startswith("<"):
        root = xml.etree.ElementTree.fromstring(text)
        urls = [o.get("xmlUrl") for o in root.iter("outline") if o.get("xmlUrl")]
    else:
        urls = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    return [http_url(u) for u in urls if u]
