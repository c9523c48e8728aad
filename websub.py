"""Push from WebSub hubs: a feed's hub POSTs each new version of it to us.

With --public-url, a feed that names a hub (or every feed, with --hub) is
subscribed to: the hub verifies the subscription at a callback of ours
(verified()), then POSTs each new version of the feed there (pushed()), which
is published through the feed's take_in(), as a fetch is. After each check
the feed's thread calls keep_pushed() to subscribe, or renew, when due; while
pushed, a feed is polled only as a safety net. Each function is handed the
settings, the store and the feeds it reads (longpoll.py's routes and Feed
call them); this module uses the request checks, feedtext and the stores, nothing of longpoll."""

import base64
import hmac
import re
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import bottle
import eventlet
import eventlet.tpool

import checks
import feedtext
import sharing
import storage

LEASE_ASKED = 10 * 86400        # seconds of WebSub lease asked of a hub; the hub grants what it will
PUSHED_INTERVAL = 3600          # while a hub pushes a feed, it is still polled this often, in case a push is lost
LEASE_FLOOR = 300               # seconds: a shorter lease a hub grants is renewed as if it were this long
VERIFY_WITHIN = 60              # seconds a hub has to verify a subscription before it is reported and asked again
ASK_AGAIN = 3600                # seconds before a refused subscription is asked again (as a failing feed's backoff)


def discover(link_headers, links, url):
    """(hub, topic) of a fetched feed: from its HTTP Link headers first, then from
    its own links; the topic is the feed's self URL, else the URL it was fetched from."""
    found = {}
    for value in link_headers:
        for target, params in re.findall(r"<([^>]*)>([^,<]*)", value):
            rel = re.search(r"""rel\s*=\s*"?([^";]+)""", params)
            for name in rel[1].lower().split() if rel else ():
                found.setdefault(name, urllib.parse.urljoin(url, target.strip()))
    for name, href in links:
        found.setdefault(name, href)
    return feedtext.safe_link(found.get("hub")) or None, feedtext.safe_link(found.get("self")) or url


def hub_of(feed, settings):
    """The hub to subscribe a feed through: --hub (its credentials left out), else the one it names."""
    return settings.hub and sharing.without_credentials(settings.hub) or feed and feed.hub


def keep_pushed(feed, delay, settings, store):
    """After a check: subscribe the feed to its hub, or renew its lease, when due.
    Return the delay until its next check: while it is pushed, a slow safety net."""
    hub = hub_of(feed, settings)
    if not (settings.public_url and hub and feed.ok):
        return delay
    sub = store.subscriptions().get(feed.url)
    if not sub or (sub["hub"], sub["topic"]) != (hub, feed.topic):
        # The token makes the callback URL unguessable; the secret signs every push.
        sub = {"hub": hub, "topic": feed.topic, "token": secrets.token_urlsafe(24),
               "secret": secrets.token_hex(32), "state": "new", "requested": None,
               "lease": None, "expires": None, "why": None, "last_push": None}
    now = time.time()
    renew_at = renewal(sub)
    asked_lately = sub["requested"] and now - sub["requested"] < VERIFY_WITHIN
    if sub["state"] == "new" or (now >= renew_at and not asked_lately and (
            sub["state"] in ("verified", "requested") or now - sub["requested"] >= ASK_AGAIN)):
        sub = ask_hub(feed.url, sub, settings, store)
    # A lease too short to use is polled as usual: it would lapse long before its renewal.
    if sub["state"] == "verified" and sub["expires"] > now and (sub["lease"] or 0) >= LEASE_FLOOR:
        return max(1, min(max(delay, PUSHED_INTERVAL), renew_at - now))
    return delay


def ask_hub(url, sub, settings, store):
    """Send the hub the subscription request; return the subscription as it is then."""
    # Kept before asking: a hub may verify before it answers.
    sub = {**sub, "requested": time.time(), "state": "verified" if sub["state"] == "verified" else "requested"}
    store.subscribe(url, sub)
    form = {"hub.mode": "subscribe", "hub.topic": sub["topic"], "hub.callback": callback_url(sub, settings),
            "hub.secret": sub["secret"], "hub.lease_seconds": LEASE_ASKED}
    # The --hub flag's URL, if this is its hub, holds the credentials; the stored one never does.
    parts = urllib.parse.urlsplit(settings.hub if settings.hub and hub_of(None, settings) == sub["hub"] else sub["hub"])
    headers = {"Content-Type": "application/x-www-form-urlencoded", "User-Agent": "longpoll/1.0 (WebSub)"}
    if parts.username is not None:
        # Credentials go in a header, never in a URL that an error message might show.
        user_pass = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(user_pass.encode()).decode()
    request = urllib.request.Request(sub["hub"], data=urllib.parse.urlencode(form).encode(), headers=headers)
    try:
        with eventlet.Timeout(settings.fetch_timeout,
                              feedtext.FetchError(f"no answer within {settings.fetch_timeout:g} s")):
            try:
                with urllib.request.urlopen(request, timeout=settings.fetch_timeout):
                    return sub
            except urllib.error.HTTPError as e:
                reason = feedtext.plain_text(e.read(1000).decode("utf-8", "replace"), 200)
                raise feedtext.FetchError(f"HTTP {e.code} {e.reason}: {reason}") from None
            except urllib.error.URLError as e:
                raise feedtext.FetchError(f"cannot reach it: {getattr(e.reason, 'strerror', None) or e.reason}") from None
    except feedtext.FetchError as e:
        sub = store.subscriptions().get(url, sub)
        sub = {**sub, "why": f"the hub refused the subscription: {e}"}
        if sub["state"] == "requested":
            sub["state"] = "refused"
        store.subscribe(url, sub)
        return sub


def renewal(sub):
    """When a subscription's lease is renewed: with a quarter of it left, a day at most.
    A lease under LEASE_FLOOR counts as that long, else a hub granting 0 s is asked again at once, in a loop."""
    granted = sub["lease"] or 0
    lease = max(granted, LEASE_FLOOR)
    return (sub["expires"] or 0) - granted + lease - min(lease / 4, 86400)


def wake(feed, why="lease"):
    """Have the feed's thread plan its subscription afresh now, and check it if it is
    due, or at once if why is "denied"."""
    if not feed.wake.ready():
        feed.wake.send(why)


def callback_url(sub, settings):
    return f"{settings.public_url}/websub/{sub['token']}"


def push_status(feed, sub, settings):
    """How a feed gets its entries, for /status and the feed page: pushed, or polled and why."""
    # The subscription's hub, for a process that has not fetched the feed itself.
    hub = hub_of(feed, settings) or (sub or {}).get("hub")
    now = time.time()
    state, why = "polled", None
    if not settings.public_url:
        why = "no --public-url: hubs cannot reach this server"
    elif not hub:
        why = "the feed names no WebSub hub" if feed.last_checked else "not checked yet"
    elif not sub:
        why = "not subscribed yet"
    elif sub["state"] == "verified" and sub["expires"] > now:
        state, why = "pushed", sub["why"]
    elif sub["state"] == "verified":
        why = sub["why"] or "the hub's lease ended; renewing"
    elif sub["state"] == "requested":
        state = "subscribing"
        if now - sub["requested"] > VERIFY_WITHIN:
            state, why = "polled", f"the hub has not verified the subscription within {VERIFY_WITHIN} s"
    else:
        why = sub["why"]
    sub = sub or {}
    return {"state": state, "why": why, "hub": sub.get("hub", hub), "topic": sub.get("topic", feed.topic),
            "lease_ends": sub.get("expires"), "last_push": sub.get("last_push"),
            "ignored_pushes": feed.pushes_ignored}


def subscription(token, settings, store, feeds):
    """(the feed, its subscription) whose callback this is, or a 404; 410 for a feed
    no longer configured, which tells its hub to stop. Without --public-url, none is open."""
    if settings.public_url and re.fullmatch(r"[A-Za-z0-9_-]{32}", token):
        try:
            subs = store.subscriptions()
        except storage.StoreError:
            checks.fail(503, "the server cannot read its subscriptions right now", Retry_After="10")
        for url, sub in subs.items():
            if hmac.compare_digest(str(sub.get("token")), token):
                feed = next((f for f in feeds if f.url == url), None)
                if feed is None:
                    checks.fail(410, "this feed is no longer followed")
                return feed, sub
    checks.fail(404, "no such subscription")


def verified(token, settings, store, feeds):
    """The hub's check that we asked for a subscription, or its word that it denied one."""
    feed, sub = subscription(token, settings, store, feeds)
    query = urllib.parse.parse_qs(bottle.request.environ.get("QUERY_STRING", ""))
    mode, topic, lease, reason = (query.get("hub." + k, [""])[0] for k in ("mode", "topic", "lease_seconds", "reason"))
    if topic != sub["topic"]:
        checks.fail(404, "no such subscription")
    checks.no_store()
    if mode == "denied":
        store.subscribe(feed.url, {**sub, "state": "denied", "expires": None,
                                   "why": "the hub denied the subscription: " + (feedtext.plain_text(reason, 200) or "no reason given")})
        store.release(feed.url)     # whichever process holds the feed: it is polled again now, here
        wake(feed, "denied")
        return ""
    # The challenge goes back byte for byte: read as Latin-1, which maps every byte to one character.
    challenge = urllib.parse.parse_qs(bottle.request.environ.get("QUERY_STRING", ""),
                                      encoding="latin-1").get("hub.challenge", [""])[0]
    if mode != "subscribe" or not challenge or not (sub["requested"] or sub["state"] == "verified"):
        checks.fail(404, "no such subscription")
    lease = int(lease) if re.fullmatch(r"[0-9]{1,9}", lease) else LEASE_ASKED
    why = None
    if lease < LEASE_FLOOR:
        # Said in /status: such a hub's pushes come only between renewals, and the feed is polled meanwhile.
        why = (f"the hub grants leases too short to use ({lease} s): the feed is polled, "
               f"and the lease renewed as if it were {LEASE_FLOOR} s")
    sub = {**sub, "state": "verified", "requested": None, "lease": lease, "expires": time.time() + lease, "why": why}
    store.subscribe(feed.url, sub)
    if feed.next_check and renewal(sub) < feed.next_check:
        wake(feed)      # a lease shorter than the feed's wait must not end while it sleeps
    bottle.response.content_type = "text/plain"
    return challenge.encode("latin-1")


def pushed(token, settings, store, feeds):
    """A new version of the feed, from its hub: published once, however it also arrives."""
    feed, sub = subscription(token, settings, store, feeds)
    req = bottle.request
    raw = checks.read_body(settings, feedtext.MAX_FEED_BYTES)
    method, _, signature = req.get_header("X-Hub-Signature", "").partition("=")
    if method not in ("sha1", "sha256", "sha384", "sha512") or not hmac.compare_digest(
            hmac.new(sub["secret"].encode(), raw, method).hexdigest(), signature.strip().lower()):
        # Not from the hub, or altered: ignored, yet answered as a good one is,
        # so that probing tells nothing.
        feed.pushes_ignored += 1
        return accepted()
    # Hubs copy the topic's Content-Encoding beside a body they already decoded.
    encoding = req.get_header("Content-Encoding", "") if raw[:2] == b"\x1f\x8b" else ""
    try:
        title, entries, _ = eventlet.tpool.execute(feedtext.parse_feed, feedtext.decompress(raw, encoding), {
            "content-type": req.get_header("Content-Type", ""), "content-location": feed.url})
    except Exception as e:          # signed, so the hub's doing: said in the log, and not retried
        print(f"longpoll: a push for {feed.url} was not a feed: {e}", file=sys.stderr, flush=True)
        return accepted()
    try:
        feed.take_in(title, entries, feed.etag, feed.modified)
        store.subscribe(feed.url, {**store.subscriptions().get(feed.url, sub), "last_push": time.time()})
    except storage.StoreError:
        checks.fail(503, "the server cannot store entries right now", Retry_After="10")   # the hub retries
    return accepted()


def accepted():
    bottle.response.status = 202
    bottle.response.content_type = "text/plain"
    checks.no_store()
    return ""
