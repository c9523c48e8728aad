"""A feed fetched, and the cleaning of its entries: a body made into plain text.

A feed is someone else's markup. What leaves this module is plain text and
http(s) links only, so a page can show it without ever reading it as HTML.
fetch() bounds a fetch in time and size; parse_feed() runs in an OS thread
(eventlet.tpool), so nothing here touches anything shared. It uses the
standard library, eventlet and feedparser, nothing of the app."""

import email.utils
import html.parser
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import eventlet
import feedparser

MAX_FEED_BYTES = 5 * 1024 * 1024  # per fetch, after decompression
SUMMARY_CHARS = 400


class FetchError(Exception):
    """A feed could not be fetched or read; the message is shown to users."""

    def __init__(self, message, retry_after=0):
        super().__init__(message)
        self.retry_after = retry_after


def fetch(url, etag, modified, timeout):
    """(body, response headers) of the feed at url, or None if unchanged since the
    fetch that gave these validators; a FetchError that says why if it cannot be had."""
    headers = {"User-Agent": "longpoll/1.0 (+feed stream demo)", "Accept-Encoding": "gzip, deflate"}
    if etag:
        headers["If-None-Match"] = etag
    if modified:
        headers["If-Modified-Since"] = modified
    request = urllib.request.Request(url, headers=headers)
    # urlopen's timeout is per socket operation; the Timeout bounds the whole
    # fetch, so a server that drips a byte a second is cut off too.
    with eventlet.Timeout(timeout, FetchError(f"no complete answer within {timeout:g} s")):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read(MAX_FEED_BYTES + 1)
                headers = response.headers
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return None
            raise FetchError(f"HTTP {e.code} {e.reason}",
                             retry_after=retry_after(e.headers.get("Retry-After"))) from None
        except urllib.error.URLError as e:
            reason = getattr(e.reason, "strerror", None) or e.reason
            raise FetchError(f"cannot fetch: {reason}") from None
    return decompress(body, headers.get("Content-Encoding", "")), headers


def retry_after(value):
    """Seconds a Retry-After header asks for (a number or an HTTP date), or 0."""
    if not value:
        return 0
    if value.strip().isdigit():
        return min(int(value), 86400)
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return 0
    return min(max(0, when - time.time()), 86400)


def decompress(body, encoding):
    """The body, decompressed when the server compressed it, refusing bombs."""
    if len(body) > MAX_FEED_BYTES:
        raise FetchError(f"feed is larger than {MAX_FEED_BYTES // 2**20} MB")
    if encoding.strip().lower() in ("gzip", "x-gzip", "deflate"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)   # gzip or zlib framing
        try:
            body = inflater.decompress(body, MAX_FEED_BYTES + 1)
        except zlib.error as e:
            raise FetchError(f"cannot decompress the feed: {e}") from None
        if len(body) > MAX_FEED_BYTES:
            raise FetchError(f"feed is larger than {MAX_FEED_BYTES // 2**20} MB uncompressed")
    return body


class TextOnly(html.parser.HTMLParser):
    """Plain text from HTML: tags dropped, entities decoded, scripts and styles skipped."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        self.skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self.skip -= tag in ("script", "style") and self.skip > 0

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def plain_text(markup, limit=None):
    parser = TextOnly()
    parser.feed(markup or "")
    parser.close()
    text = " ".join("".join(parser.parts).split())
    if limit and len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + "…"
    return text


def safe_link(url):
    url = (url or "").strip()
    return url if urllib.parse.urlsplit(url).scheme.lower() in ("http", "https") else ""


def parse_feed(body, headers):
    """(feed title, entries as plain dicts, the feed's (rel, href) links for WebSub);
    runs in an OS thread, so it touches nothing shared."""
    parsed = feedparser.parse(body, response_headers=headers)
    if not parsed.entries and (parsed.bozo or not parsed.version):
        raise FetchError(f"not a feed: {parsed.get('bozo_exception') or 'no Atom or RSS found'}")
    entries = []
    for e in parsed.entries:
        when = e.get("published_parsed") or e.get("updated_parsed")
        published = time.strftime("%Y-%m-%dT%H:%M:%SZ", when) if when else None
        title = plain_text(e.get("title"))
        link = safe_link(e.get("link"))
        entries.append({
            "key": e.get("id") or link or f"{title}|{published}",
            "title": title,
            "link": link,
            "summary": plain_text(e.get("summary"), SUMMARY_CHARS),
            "published": published,
        })
    links = [(link.get("rel"), link.get("href")) for link in parsed.feed.get("links", ())]
    return plain_text(parsed.feed.get("title")), entries, links
