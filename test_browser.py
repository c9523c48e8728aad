"""Both pages in a real browser: headless Chromium driven by Playwright, against
the real server on a free port and a local feed server.

Run with: python -m pytest test_browser.py (a process of its own: Playwright and
eventlet's monkey-patching in test_longpoll.py do not mix).
"""

import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from xml.sax.saxutils import escape
from pathlib import Path

import pytest

from conftest import FeedServer, Hub, atom, free_port, hubbed, numbered

HERE = Path(__file__).resolve().parent
# The README's screenshots are retaken only when asked (SCREENSHOTS=docs), so a
# test run leaves the repository as it was.
SHOTS = os.environ.get("SCREENSHOTS")
HOSTILE = [
    '<img src=x onerror="window.pwned=1">',
    "<script>window.pwned=2</script>",
    "javascript:window.pwned=3",
    '"><svg onload="window.pwned=4">',
]


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        missing(f"Playwright is not installed ({e})")
    with sync_playwright() as p:
        system = shutil.which("chromium") or shutil.which("chromium-browser")
        try:
            browser = p.chromium.launch(executable_path=system, args=CHROMIUM_ARGS)
        except Exception as e:          # no system Chromium and none installed by Playwright
            missing(f"no Chromium to run: {str(e).splitlines()[0]}")
        yield browser
        browser.close()


def missing(reason):
    # Locally a missing browser skips; in CI it must fail, never pass silently.
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run in CI: {reason}")
    pytest.skip(reason)


def dispatched(page, condition, timeout=5):
    """Let Playwright dispatch its events (a route handler's, say) until condition() holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        page.wait_for_timeout(10)


@pytest.fixture
def new_context(browser):
    """A fresh browser context, with init scripts run in each of its pages (which
    share one connection pool, as a profile's tabs do). It is closed after the
    test, and an uncaught JavaScript error on any of its pages fails the test."""
    contexts, errors = [], []

    def make(*init_scripts, **context_options):
        context = browser.new_context(**context_options)
        contexts.append(context)
        context.on("page", lambda page: page.on("pageerror", lambda e: errors.append(str(e))))
        for script in init_scripts:
            context.add_init_script(script)
        return context
    yield make
    for context in contexts:
        context.close()
    assert errors == [], errors


@pytest.fixture
def open_page(new_context):
    """Open a page in a fresh browser context."""
    def opener(url, **context_options):
        page = new_context(**context_options).new_page()
        page.goto(url)
        return page
    return opener


@pytest.fixture
def chat_server(start):
    return start("--poll-timeout", "5", "--post-burst", "1000")


def send(page, text):
    page.fill("#body", text)
    page.press("#body", "Enter")


def test_chat_between_two_windows(chat_server, open_page):
    from playwright.sync_api import expect
    url = f"http://{chat_server.host}:{chat_server.port}/"
    alice, bob = open_page(url), open_page(url)
    expect(bob.locator("#state")).to_have_text("Live")
    alice.fill("#nick", "alice")
    send(alice, "hello bob, see https://example.com/x.")
    expect(alice.locator("#body")).to_have_value("")
    message = bob.locator("#messages .message").last
    expect(message).to_contain_text("hello bob", timeout=1500)
    expect(message.locator(".nick")).to_have_text("alice")
    expect(message.locator(".time")).to_have_text(re.compile(r"\d{1,2}:\d{2}"))
    link = message.locator("a")
    expect(link).to_have_attribute("href", "https://example.com/x")
    assert message.locator(".text").inner_text() == "hello bob, see https://example.com/x."
    expect(alice.locator("#messages .message")).to_have_count(1)


def test_hostile_text_is_shown_literally_and_runs_nothing(chat_server, open_page):
    from playwright.sync_api import expect
    page = open_page(f"http://{chat_server.host}:{chat_server.port}/")
    page.fill("#nick", "<b>mallory</b>")
    for text in HOSTILE:
        send(page, text)
        expect(page.locator("#messages .message").last.locator(".text")).to_have_text(text)
    texts = page.locator("#messages .text").all_inner_texts()
    assert texts == HOSTILE
    assert page.locator("#messages .nick").first.inner_text() == "<b>mallory</b>"
    assert page.locator("#messages img, #messages script, #messages svg, #messages b").count() == 0
    assert page.locator("#messages a").count() == 0       # javascript: never becomes a link
    assert page.evaluate("window.pwned") is None


def test_nick_survives_a_reload_and_history_is_shown(chat_server, open_page):
    from playwright.sync_api import expect
    page = open_page(f"http://{chat_server.host}:{chat_server.port}/")
    page.fill("#nick", "grace")
    send(page, "first")
    send(page, "second")          # typed at once after the first: posted after it, shown after it
    expect(page.locator("#messages .text")).to_have_text(["first", "second"])
    page.reload()
    expect(page.locator("#nick")).to_have_value("grace")
    expect(page.locator("#messages .text")).to_have_text(["first", "second"])


def test_an_empty_room_says_so_until_its_first_message(start, open_page):
    from playwright.sync_api import expect
    srv = start()
    page = open_page(f"http://{srv.host}:{srv.port}/")
    top = page.locator("#messages .past")
    expect(top).to_have_text("No messages yet. Write the first one below.")
    page.fill("#nick", "first")
    send(page, "hello, anyone?")
    expect(page.locator("#messages .text")).to_have_text(["hello, anyone?"])
    expect(top).to_have_text("The beginning")          # nothing came before it


def test_messages_typed_in_a_row_are_posted_and_shown_in_that_order(chat_server, open_page):
    from playwright.sync_api import expect
    page = open_page(f"http://{chat_server.host}:{chat_server.port}/")
    expect(page.locator("#state")).to_have_text("Live")
    held = []                   # the first post is held on its way; any later one goes on at once
    page.route("**/chat/messages", lambda route: route.continue_() if held else held.append(route))
    send(page, "first")
    send(page, "second")
    dispatched(page, lambda: held)
    # Time for a second post sent at once to overtake the first (it must not be sent yet).
    page.wait_for_timeout(300)
    held[0].continue_()
    expect(page.locator("#messages .text")).to_have_text(["first", "second"])
    expect(page.locator("#notice")).to_be_hidden()


# As a page in a cross-site frame, or under strict privacy settings, finds it.
STORAGE_BLOCKED = """
Object.defineProperty(window, "localStorage", {get() {
  throw new DOMException("The operation is insecure.", "SecurityError");
}});
"""


def test_the_chat_works_where_site_storage_is_blocked(chat_server, new_context):
    from playwright.sync_api import expect
    page = new_context(STORAGE_BLOCKED).new_page()
    page.goto(f"http://{chat_server.host}:{chat_server.port}/")
    expect(page.locator("#state")).to_have_text("Live")
    page.fill("#nick", "nobody stores me")
    send(page, "posted all the same")
    message = page.locator("#messages .message").last
    expect(message.locator(".text")).to_have_text("posted all the same")
    expect(message.locator(".nick")).to_have_text("nobody stores me")
    expect(message).to_have_class(re.compile(r"\bmine\b"))     # the nick lasts for the visit


def test_a_rejected_message_shows_why_and_stays_in_the_box(chat_server, open_page):
    from playwright.sync_api import expect
    page = open_page(f"http://{chat_server.host}:{chat_server.port}/")
    send(page, "bell \x07 character")
    expect(page.locator("#notice")).to_have_text("Not sent: body contains control characters.")
    expect(page.locator("#body")).to_have_value("bell \x07 character")
    expect(page.locator("#messages .message")).to_have_count(0)


def test_bidi_controls_cannot_reorder_other_text(chat_server, open_page):
    from playwright.sync_api import expect
    page = open_page(f"http://{chat_server.host}:{chat_server.port}/")
    page.fill("#nick", "admin\u202e")
    send(page, "hello")
    expect(page.locator("#notice")).to_have_text("Not sent: nick contains bidirectional-text controls.")
    page.fill("#nick", "eve")
    body = "\u202etxet desrever \U0001F469\u200d\U0001F4BB"
    page.fill("#body", body)
    page.press("#body", "Enter")
    send(page, "after it")
    expect(page.locator("#messages .text")).to_have_text([body, "after it"])
    # Each user text is isolated, so its controls reach nothing outside it.
    for selector in (".nick", ".text"):
        assert page.locator(f"#messages {selector}").first.evaluate(
            "e => getComputedStyle(e).unicodeBidi") == "plaintext"
    for message in page.locator("#messages .message").all():
        nick, time = message.locator(".nick").bounding_box(), message.locator(".time").bounding_box()
        assert nick["x"] < time["x"]


def test_the_poll_waits_as_long_as_retry_after_asks(chat_server, new_context):
    context = new_context()
    page = context.new_page()
    polls = []
    page.on("request", lambda r: "/chat/updates" in r.url and polls.append(time.monotonic()))

    def refuse_first(route):
        if len(polls) == 1:
            route.fulfill(status=429, headers={"Retry-After": "3"}, json={"error": "too many polls"})
        else:
            route.continue_()
    page.route("**/chat/updates*", refuse_first)
    page.goto(f"http://{chat_server.host}:{chat_server.port}/")
    from playwright.sync_api import expect
    expect(page.locator("#state")).to_have_attribute("data-state", "live", timeout=10000)
    assert polls[1] - polls[0] >= 2.9, polls


def test_a_server_that_cannot_store_says_why_after_its_retries(chat_server, new_context):
    from playwright.sync_api import expect
    context = new_context()
    page = context.new_page()
    page.clock.install()
    tries = []

    def full_disk(route):
        tries.append(route.request.post_data_json["client_id"])
        route.fulfill(status=503, headers={"Retry-After": "10"},
                      json={"error": "the server cannot store messages right now; try again shortly"})
    page.route("**/chat/messages", full_disk)
    page.goto(f"http://{chat_server.host}:{chat_server.port}/")
    send(page, "kept for later")
    for _ in range(40):
        page.clock.run_for(1000)
    expect(page.locator("#notice")).to_have_text(
        "Not sent: the server cannot store messages right now; try again shortly.")
    expect(page.locator("#body")).to_have_value("kept for later")
    assert len(tries) == 5 and len(set(tries)) == 1         # retried, always as the same message


def test_posting_too_fast_is_shown(start, open_page):
    from playwright.sync_api import expect
    srv = start("--post-burst", "1", "--post-rate", "0.01")
    page = open_page(f"http://{srv.host}:{srv.port}/")
    send(page, "one")
    expect(page.locator("#messages .message")).to_have_count(1)
    send(page, "two")
    too_fast = re.compile(r"^You are sending messages too fast\. Try again in \d+ s\.$")
    expect(page.locator("#notice")).to_have_text(too_fast)
    expect(page.locator("#body")).to_have_value("two")


def test_the_page_reconnects_after_a_server_restart(start, open_page):
    from playwright.sync_api import expect
    first = start("--poll-timeout", "5")
    port = first.port
    page = open_page(f"http://127.0.0.1:{port}/")
    send(page, "before the restart")
    expect(page.locator("#messages .message")).to_have_count(1)
    first.stop()
    expect(page.locator("#state")).to_have_attribute("data-state", "reconnecting")
    expect(page.locator("#state")).to_have_text("Reconnecting…")
    second = start("--poll-timeout", "5", "--port", str(port))
    second.post({"nick": "server", "body": "posted before the page is back"})
    expect(page.locator("#state")).to_have_text("Live", timeout=20000)
    second.post({"nick": "server", "body": "after the restart"})
    expect(page.locator("#messages .text")).to_have_text(
        ["before the restart", "posted before the page is back", "after the restart"], timeout=5000)
    # The history was lost with the process: the page says so, once.
    expect(page.locator("#messages .gap")).to_have_text(["Some messages were missed while you were away."])


def test_a_post_whose_answer_is_lost_is_retried_with_its_client_id_and_shown_once(chat_server, open_page):
    from playwright.sync_api import expect
    page = open_page(f"http://{chat_server.host}:{chat_server.port}/")
    sent = []

    def lose_first_answer(route):
        sent.append(route.request.post_data_json)
        if len(sent) == 1:
            route.fetch()                   # the server gets it and posts it...
            route.abort("connectionreset")  # ...and the page never hears back
        else:
            route.continue_()
    page.route("**/chat/messages", lose_first_answer)
    send(page, "only once")
    expect(page.locator("#messages .text")).to_have_text(["only once"], timeout=5000)
    dispatched(page, lambda: len(sent) >= 2, timeout=10)   # the retry comes after a backoff of a second or so
    assert len(sent) == 2 and sent[0]["client_id"] == sent[1]["client_id"] and sent[0]["client_id"]
    expect(page.locator("#notice")).to_be_hidden()
    assert [m["body"] for m in chat_server.get("/chat/updates").json()["messages"]] == ["only once"]
    page.wait_for_timeout(300)          # one more poll's worth: still shown once
    expect(page.locator("#messages .text")).to_have_text(["only once"])


# Logs, by the page's own clock, when each long poll starts.
RECORD_POLLS = """
window.polls = [];      // when each poll was sent
window.settled = [];    // and when it was answered or failed
const realFetch = window.fetch;
window.fetch = (url, options) => {
  if (!String(url).includes("/chat/updates")) return realFetch(url, options);
  window.polls.push(Date.now());
  return realFetch(url, options).finally(() => window.settled.push(Date.now()));
};
"""


def test_retries_while_the_server_is_away_back_off_with_jitter(chat_server, new_context):
    context = new_context(RECORD_POLLS)
    page = context.new_page()
    page.clock.install()                # timers run on a clock the test moves
    page.route("**/chat/updates*", lambda route: route.abort("connectionrefused"))
    page.goto(f"http://{chat_server.host}:{chat_server.port}/")
    for _ in range(6000):               # ten minutes of the page's time, 100 ms a step
        page.clock.run_for(100)
    polls, settled = page.evaluate("[window.polls, window.settled]")
    # Each backoff runs from the failure to the next poll: how long a refused
    # request takes to settle depends on how busy the machine is, not the page.
    gaps = [b - a for a, b in zip(settled, polls[1:])]
    assert len(gaps) >= 20, gaps
    # Growing: each retry waits about twice as long as the one before, up to 30 s
    # (give or take the 100 ms step in which the refused request settles).
    ceilings = [min(30000, 500 * 2 ** min(n, 6)) for n in range(1, len(gaps) + 1)]
    assert all(c / 2 - 50 <= g <= c + 150 for g, c in zip(gaps, ceilings)), gaps
    # Jittered: each wait is drawn from the upper half below its ceiling, so
    # browsers do not all return at one instant. (Twenty draws spanning less
    # than half that range: about one chance in a million.)
    ratios = [g / c for g, c in zip(gaps[2:], ceilings[2:])]
    assert max(ratios) - min(ratios) > 0.25, gaps


def test_feed_links_that_are_not_web_links_are_not_links_on_the_page(chat_server, new_context):
    from playwright.sync_api import expect
    context = new_context()
    page = context.new_page()
    entries = [{"id": n + 1, "feed": "Straight to the page", "title": f"Entry {n}", "link": link,
                "summary": "", "published": None}
               for n, link in enumerate(["javascript:window.pwned=1", "data:text/html,<b>x</b>",
                                         " JavaScript:window.pwned=2", "https://example.com/ok"])]
    answered = []

    def deliver(route):
        if not answered:
            answered.append(1)
            route.fulfill(json={"entries": entries, "cursor": 4})
        else:
            route.fulfill(json={"entries": [], "cursor": 4})
    page.route("**/feed/updates*", deliver)
    page.goto(f"http://{chat_server.host}:{chat_server.port}/feed?pace=50")
    expect(page.locator("#entries .entry")).to_have_count(4, timeout=5000)
    links = page.locator("#entries a.title")
    expect(links).to_have_count(1)
    expect(links).to_have_attribute("href", "https://example.com/ok")
    assert page.evaluate("window.pwned") is None


def test_the_page_survives_a_restart_with_its_database_and_misses_nothing(start, open_page, tmp_path):
    from playwright.sync_api import expect
    db = str(tmp_path / "chat.db")
    first = start("--poll-timeout", "5", "--db", db)
    port = first.port
    page = open_page(f"http://127.0.0.1:{port}/")
    send(page, "before the restart")
    expect(page.locator("#messages .message")).to_have_count(1)
    first.stop()
    expect(page.locator("#state")).to_have_text("Reconnecting…")
    second = start("--poll-timeout", "5", "--port", str(port), "--db", db)
    second.post({"nick": "server", "body": "posted before the page is back"})
    expect(page.locator("#state")).to_have_text("Live", timeout=20000)
    second.post({"nick": "server", "body": "after the restart"})
    expect(page.locator("#messages .text")).to_have_text(
        ["before the restart", "posted before the page is back", "after the restart"], timeout=5000)
    expect(page.locator("#messages .gap")).to_have_count(0)         # nothing was missed, so no notice


def test_scrolling_to_the_top_brings_back_every_kept_message_in_order_once(start, open_page):
    from playwright.sync_api import expect
    srv = start("--history", "20", "--post-burst", "1000", "--poll-timeout", "5")
    bodies = [f"message {n}" for n in range(130)]
    for text in bodies:
        srv.post({"nick": "past", "body": text})
    page = open_page(f"http://127.0.0.1:{srv.port}/", viewport={"width": 1280, "height": 720})
    shown = page.locator("#messages .message")
    expect(shown).to_have_count(20)                 # what the poll brings: --history of them
    for count in (70, 120, 130):
        page.evaluate("document.getElementById('messages').scrollTop = 0")
        expect(shown).to_have_count(count)
        # The reader's place is kept: the message at the top before is still in view.
        assert page.evaluate("document.getElementById('messages').scrollTop") > 40
    expect(page.locator("#messages .past")).to_have_text("The beginning")
    expect(page.locator("#messages .text")).to_have_text(bodies)


@pytest.mark.parametrize("keep, filled", [(1000, True), (12, False)], ids=["all kept", "some lost"])
def test_messages_missed_while_away_are_filled_from_the_store(start, new_context, keep, filled):
    from playwright.sync_api import expect
    srv = start("--history", "5", "--keep", str(keep), "--post-burst", "1000", "--poll-timeout", "5")
    srv.post({"body": "before"})
    context = new_context()
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{srv.port}/")
    expect(page.locator("#state")).to_have_text("Live")
    expect(page.locator("#messages .text")).to_have_text(["before"])
    context.set_offline(True)
    # The parked poll ends at its timeout; the next one finds the browser offline.
    expect(page.locator("#state")).to_have_text("Reconnecting…", timeout=15000)
    away = [f"while away {n}" for n in range(30)]
    for text in away:
        srv.post({"body": text})
    context.set_offline(False)
    if filled:      # the store had every one: nothing to say
        expect(page.locator("#messages .text")).to_have_text(["before"] + away, timeout=20000)
        expect(page.locator("#messages .gap")).to_have_count(0)
    else:           # only the newest 12 are kept: those, and the notice before them
        expect(page.locator("#messages .text")).to_have_text(["before"] + away[-12:], timeout=20000)
        expect(page.locator("#messages .gap")).to_have_text(["Some messages were missed while you were away."])
        assert page.evaluate("document.querySelector('#messages .gap').nextElementSibling.textContent").endswith(away[-12])


# -- Each message once, whichever way it came ------------------------------------
# The live poll, the store's pages (an empty room's first load, scroll-back, gap
# filling) and another tab's broadcast can bring the same message. Routes hold
# the answers, so that both land, in the order each test chooses.

STORE_PAGE = re.compile(r"/chat/messages\?")


def hold(page, pattern, which=lambda url: True):
    """Hold the page's requests to `pattern` that `which(url)` picks, in a list, until the test lets each go."""
    routes = []
    page.route(pattern, lambda route: routes.append(route) if which(route.request.url) else route.continue_())
    return routes


def is_poll(url):
    return "cursor=" in url            # the history, asked without a cursor, goes on


def shown_once(page, texts):
    """The log shows exactly these texts, in order, and no data-id twice."""
    from playwright.sync_api import expect
    expect(page.locator("#messages .text")).to_have_text(texts)
    ids = page.eval_on_selector_all("#messages .message", "items => items.map(item => item.dataset.id)")
    assert len(set(ids)) == len(ids) == len(texts), ids


@pytest.mark.parametrize("order", ["store page first", "poll between"])
def test_a_new_rooms_first_messages_show_once_in_order_whichever_answer_lands_first(start, new_context, order):
    srv = start("--poll-timeout", "20")
    page = new_context().new_page()
    polls, pages = hold(page, "**/chat/updates*", is_poll), hold(page, STORE_PAGE)
    page.goto(f"http://127.0.0.1:{srv.port}/")
    dispatched(page, lambda: polls and pages)   # the empty history came; the poll and the first page wait
    srv.post({"nick": "bob", "body": "first"})
    if order == "store page first":
        srv.post({"nick": "bob", "body": "second"})
        pages[0].continue_()                    # the newest page: both
        shown_once(page, ["first", "second"])
    else:
        polls[0].continue_()                    # the poll: the first
        shown_once(page, ["first"])
        dispatched(page, lambda: len(polls) == 2)
        srv.post({"nick": "bob", "body": "second"})
        pages[0].continue_()                    # the newest page: both
        shown_once(page, ["first", "second"])
    sent = len(polls)
    polls[-1].continue_()                       # the poll: what the page already shows, or part of it
    dispatched(page, lambda: len(polls) > sent)     # the next poll went out: that answer was shown
    shown_once(page, ["first", "second"])


@pytest.mark.parametrize("order", ["gap filled first", "poll first"])
def test_a_message_that_a_poll_and_the_gap_filling_both_bring_shows_once(start, new_context, order):
    first = start("--poll-timeout", "20")
    port = first.port
    first.post({"body": "before the restart"})
    page = new_context().new_page()
    polls = hold(page, "**/chat/updates*", is_poll)
    page.goto(f"http://127.0.0.1:{port}/")
    from playwright.sync_api import expect
    expect(page.locator("#messages .past")).to_have_text("The beginning")     # the first page came
    dispatched(page, lambda: polls)
    pages = hold(page, STORE_PAGE)
    first.stop()
    # An empty store: its ids go on from the clock, above the page's, and it
    # answers the held poll with nothing and a gap, which the page fills from the newest page.
    second = start("--poll-timeout", "20", "--port", str(port))
    polls[0].continue_()
    dispatched(page, lambda: pages and len(polls) == 2)
    second.post({"body": "after the restart"})
    held = [pages[0], polls[1]] if order == "gap filled first" else [polls[1], pages[0]]
    held[0].continue_()
    shown_once(page, ["before the restart", "after the restart"])
    held[1].continue_()
    dispatched(page, lambda: len(polls) == 3 and page.locator("#messages .gap").inner_text().startswith("Some"))
    shown_once(page, ["before the restart", "after the restart"])


def test_a_message_that_a_broadcast_and_the_first_page_both_bring_shows_once(start, new_context):
    srv = start("--poll-timeout", "20")
    context = new_context()
    leader, tab = context.new_page(), context.new_page()
    polls = hold(leader, "**/chat/updates*", is_poll)
    leader.goto(f"http://127.0.0.1:{srv.port}/")
    dispatched(leader, lambda: polls)           # it leads; its poll waits
    pages = hold(tab, STORE_PAGE)
    tab.goto(f"http://127.0.0.1:{srv.port}/")
    dispatched(tab, lambda: pages)              # the second tab's empty history came; its first page waits
    tab.evaluate("""() => { window.told = false;     // after the page's own channel: told after it heard
        new BroadcastChannel("longpoll /chat/updates").onmessage = ({data}) => {
            if (data.batch && data.batch.messages.length) window.told = true; }; }""")
    srv.post({"nick": "bob", "body": "hello"})
    pages[0].continue_()
    shown_once(tab, ["hello"])
    polls[0].continue_()                        # the leader shows it and tells the other tab
    shown_once(leader, ["hello"])
    dispatched(tab, lambda: tab.evaluate("window.told"))
    shown_once(tab, ["hello"])


RECORD_HERE = """
window.hereSeen = [];
document.addEventListener("DOMContentLoaded", () => {
  const here = document.getElementById("here");
  new MutationObserver(() => window.hereSeen.push(here.hidden ? "" : here.textContent))
    .observe(here, {childList: true, characterData: true, subtree: true, attributes: true});
});
"""


def nicked(name):
    return f"try {{ localStorage.setItem('longpoll.nick', {name!r}); }} catch (err) {{}}"   # not on about:blank


def test_who_is_here_across_browsers_tabs_reloads_and_a_last_tab_closed(start, new_context):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "5")
    url = f"http://127.0.0.1:{srv.port}/"
    alice_browser, bob_browser = new_context(nicked("alice")), new_context(nicked("bob"), RECORD_HERE)
    alice = alice_browser.new_page()
    alice.goto(url)
    expect(alice.locator("#here")).to_be_hidden()                  # quiet when only you are
    bob = bob_browser.new_page()
    bob.goto(url)
    expect(bob.locator("#here")).to_have_text("Here: alice, bob")
    expect(alice.locator("#here")).to_have_text("Here: alice, bob")
    # A second tab of alice's browser is not a second person.
    second = alice_browser.new_page()
    second.goto(url)
    expect(second.locator("#here")).to_have_text("Here: alice, bob")
    srv.wait_for(lambda s: s["streams"]["chat"]["waiting"] == 2)   # one chat poll per browser, tabs or not
    assert srv.get("/presence").json()["count"] == 2
    # Closing one of her two tabs, then reloading the one left: bob never sees her leave.
    assert "Here: alice, bob" in bob.evaluate("window.hereSeen")      # the record works
    bob.evaluate("window.hereSeen = []")
    second.close()
    alice.wait_for_timeout(3000)        # past the leave's delay: a leave not undone would show by now
    alice.reload()
    expect(alice.locator("#here")).to_have_text("Here: alice, bob")
    alice.wait_for_timeout(3000)
    assert all(seen == "Here: alice, bob" for seen in bob.evaluate("window.hereSeen")), bob.evaluate("window.hereSeen")
    # Her last tab closed: gone from bob's page within 3 s.
    alice.close()
    closed = time.monotonic()
    expect(bob.locator("#here")).to_be_hidden(timeout=3000)
    assert time.monotonic() - closed < 3


# Titles that are markup-looking text (escaped once more, as a feed would send
# text), summaries that are real markup (which the server strips), and javascript: links.
HOSTILE_ENTRIES = [(f"urn:h{n}", escape(text), "javascript:window.pwned=9", text + " summary")
                   for n, text in enumerate(HOSTILE)]


@pytest.fixture
def feed_setup(request, start, tmp_path):
    """A feed server, configured before the app starts (so its first fetch sees
    what the test wants), and the app polling it. A test marked
    @pytest.mark.first_feed(body) serves that body first; else hostile entries."""
    marker = request.node.get_closest_marker("first_feed")
    feeds = FeedServer()
    feeds.feed("/a.xml", marker.args[0] if marker else atom(HOSTILE_ENTRIES + numbered(1, 1), title="Fixture Atom"))
    feeds.status("/broken.xml", 500)
    listing = tmp_path / "feeds.txt"
    listing.write_text(f"{feeds.url}/a.xml\n{feeds.url}/broken.xml\n")
    try:
        yield start("--feeds", str(listing), "--feed-interval", "1", "--poll-timeout", "5"), feeds
    finally:
        feeds.close()


# Records when each entry joins the stream, and how many join at once.
RECORD_ARRIVALS = """
window.arrivals = [];
document.addEventListener("DOMContentLoaded", () => {
  new MutationObserver(records => {
    const added = records.reduce((n, r) => n + r.addedNodes.length, 0);
    if (added) window.arrivals.push({at: performance.now(), added});
  }).observe(document.getElementById("entries"), {childList: true});
});
"""


def test_feed_entries_flow_one_by_one_and_hover_pauses(feed_setup, new_context):
    from playwright.sync_api import expect
    srv, feeds = feed_setup
    srv.wait_for(lambda s: sum(f["entries"] for f in s["feeds"]) == 5)     # the first fetch is in
    page = new_context(RECORD_ARRIVALS).new_page()
    page.goto(f"http://{srv.host}:{srv.port}/feed?pace=400")
    entries = page.locator("#entries .entry")
    # A new page shows what is there at once, newest on top...
    expect(entries).to_have_count(5, timeout=3000)
    assert [a["added"] for a in page.evaluate("window.arrivals")] == [5]
    expect(page.locator("#feeds")).to_contain_text("HTTP 500")  # the broken feed, and why
    # Hostile titles and summaries are text, and their javascript: links are not links.
    assert page.locator("#entries .title").all_inner_texts() == HOSTILE + ["Entry 1"]
    assert page.locator("#entries a[href^='javascript']").count() == 0
    assert page.locator("#entries img, #entries script, #entries svg").count() == 0
    assert page.evaluate("window.pwned") is None
    # ...and what arrives later flows in one at a time, at a steady pace.
    feeds.feed("/a.xml", atom(numbered(1, 5) + HOSTILE_ENTRIES, title="Fixture Atom"))
    expect(page.locator("#entries .title").first).to_have_text("Entry 5", timeout=10000)
    arrivals = page.evaluate("window.arrivals")[1:]
    assert [a["added"] for a in arrivals] == [1] * 4            # one at a time
    gaps = [b["at"] - a["at"] for a, b in zip(arrivals, arrivals[1:])]
    assert all(300 < gap < 800 for gap in gaps), gaps          # at a steady pace
    # Hover: the stream freezes while new entries keep filling the queue.
    page.hover("#entries")
    expect(page.locator("#pace")).to_have_text("Paused")
    shown = entries.count()
    feeds.feed("/a.xml", atom(numbered(1, 12) + HOSTILE_ENTRIES, title="Fixture Atom"))
    expect(page.locator("#waiting")).to_have_text("7 waiting", timeout=10000)
    page.wait_for_timeout(1200)                 # three steps' worth of time, paused
    expect(entries).to_have_count(shown)
    page.mouse.move(0, 0)
    expect(page.locator("#pace")).to_have_text("Live")
    expect(page.locator("#waiting")).to_have_text("0 waiting", timeout=5000)
    expect(page.locator("#entries .title").first).to_have_text("Entry 12")
    # On a touch screen there is no hover: the Live button pauses and resumes.
    page.click("#pace")
    expect(page.locator("#pace")).to_have_text("Paused")
    page.mouse.move(0, 0)
    expect(page.locator("#pace")).to_have_text("Paused")
    page.click("#pace")
    expect(page.locator("#pace")).to_have_text("Live")


def test_feed_page_never_scrolls(feed_setup, open_page):
    from playwright.sync_api import expect
    srv, feeds = feed_setup
    page = open_page(f"http://{srv.host}:{srv.port}/feed?pace=20", viewport={"width": 1280, "height": 800})
    expect(page.locator("#entries .entry").first).to_be_visible(timeout=5000)
    # Hundreds of new entries, a few dozen per fetch.
    for first in range(2, 302, 30):
        feeds.feed("/a.xml", atom(numbered(first, first + 29), title="Fixture Atom"))
        expect(page.locator("#entries .title").first).to_have_text(f"Entry {first + 29}", timeout=15000)
    sizes = page.evaluate("""() => ({
        scroll: document.scrollingElement.scrollHeight, view: innerHeight,
        shown: document.querySelectorAll('#entries .entry').length})""")
    assert sizes["scroll"] <= sizes["view"], sizes
    assert 3 <= sizes["shown"] < 40, sizes          # old entries were dropped


def test_the_feed_page_says_which_feeds_are_pushed_and_shows_a_push_at_once(start, new_context):
    from playwright.sync_api import expect
    hub, feeds = Hub(), FeedServer()
    try:
        topic = feeds.feed("/pushed.xml", hubbed(numbered(1, 2), hub.url, title="Pushed"))
        polled = feeds.feed("/polled.xml", atom(numbered(1, 1), title="Polled"))
        port = free_port()
        srv = start("--port", str(port), "--public-url", f"http://127.0.0.1:{port}", "--feed", topic,
                    "--feed", polled, "--feed-interval", "300", "--poll-timeout", "5")
        hub.wait(lambda h: h.subs)
        srv.wait_for(lambda s: s["feeds"][0]["push"]["state"] == "pushed" and s["feeds"][1]["last_checked"])
        page = new_context().new_page()
        page.goto(f"http://{srv.host}:{srv.port}/feed?pace=100")
        sources = page.locator("#feeds .source-state")
        expect(sources.nth(0).locator(".via")).to_have_text(f"pushed via 127.0.0.1:{hub.httpd.server_address[1]}")
        expect(sources.nth(1).locator(".via")).to_have_text("polled")
        assert "names no WebSub hub" in sources.nth(1).get_attribute("title")   # why, on hover
        expect(page.locator("#entries .entry")).to_have_count(3)
        srv.wait_for(lambda s: s["streams"]["feed"]["waiting"] == 1)     # the page's poll is parked
        assert hub.push(topic, hubbed(numbered(1, 3), hub.url, title="Pushed")) == 202
        expect(page.locator("#entries .title").first).to_have_text("Entry 3", timeout=3000)
    finally:
        hub.close()
        feeds.close()


SHOWCASE = atom([
    (f"urn:s{n}", title, f"https://example.com/{n}", summary) for n, (title, summary) in enumerate([
        ("Green threads explained in five minutes", "Why a parked request costs kilobytes, not a thread."),
        ("Long polling versus WebSockets", "Plain HTTP works through every proxy; here is what it costs."),
        ("Feed parsing without freezing the server", "Moving CPU-bound work off the hub."),
        ("A chat room in one small file", "Bottle, eventlet and one Event per stream."),
        ("Backoff with jitter", "How a thousand browsers come back after a restart without a stampede."),
    ])], title="Engineering notes")


@pytest.mark.first_feed(SHOWCASE)
def test_both_pages_fit_desktop_and_phone_and_are_photographed(feed_setup, open_page, new_context, tmp_path):
    """Each page fits its viewport without sideways scrolling. The screenshots go to a
    temporary folder, or with SCREENSHOTS=docs to docs/ for the README."""
    from playwright.sync_api import expect
    srv, feeds = feed_setup
    shots = HERE / SHOTS if SHOTS else tmp_path
    srv.post({"nick": "ada", "body": "Has anyone tried the feed page? It never scrolls."})
    srv.post({"nick": "grace", "body": "Yes, hover over it and it pauses. Docs: https://example.com/longpoll"})
    srv.post({"nick": "linus", "body": "<script>alert('hi')</script> shows up as plain text, as it should."})
    new_context(nicked("grace")).new_page().goto(f"http://{srv.host}:{srv.port}/")     # someone else is here
    for name, size in (("desktop", {"width": 1280, "height": 720}), ("phone", {"width": 390, "height": 760})):
        chat = new_context(nicked("ada"), viewport=size).new_page()
        chat.goto(f"http://{srv.host}:{srv.port}/")
        expect(chat.locator("#messages .message")).to_have_count(3)
        expect(chat.locator("#here")).to_have_text(re.compile(r"^Here: (ada, grace|grace, ada)$"))
        fits(chat, "#compose")
        chat.screenshot(path=shots / f"chat-{name}.png")
        chat.close()                            # ada is here once, whichever size she uses
        feed = open_page(f"http://{srv.host}:{srv.port}/feed?pace=100", viewport=size)
        expect(feed.locator("#entries .entry")).to_have_count(5, timeout=10000)
        expect(feed.locator("#entries .title")).to_have_text([      # the showcase, newest on top
            "Green threads explained in five minutes", "Long polling versus WebSockets",
            "Feed parsing without freezing the server", "A chat room in one small file", "Backoff with jitter"])
        expect(feed.locator("#feeds")).to_contain_text("HTTP 500")
        feed.wait_for_timeout(600)                 # let the last entry's fade-in finish
        fits(feed, "#stream")
        feed.screenshot(path=shots / f"feed-{name}.png")


def fits(page, selector):
    box = page.locator(selector).bounding_box()
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    assert 0 <= box["x"] and box["x"] + box["width"] <= width and box["y"] + box["height"] <= height, box
    assert page.evaluate("document.scrollingElement.scrollWidth") <= width


# -- Every visitor: what a screen reader hears, axe-core, focus, dark mode -------

AXE = HERE / "node_modules" / "axe-core" / "axe.min.js"
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]


def axe(page):
    """axe-core's violations on the page as it is now: [(rule, impact, [targets])]."""
    if not AXE.exists():
        missing(f"axe-core is not installed ({AXE.relative_to(HERE)}; npm ci)")
    # Once nothing is fading in: axe measures the contrast of half-faded text as it is.
    page.wait_for_function("document.getAnimations().length === 0")
    if page.evaluate("typeof axe === 'undefined'"):
        page.add_script_tag(path=str(AXE))      # inline: its context bypasses the pages' CSP
    result = page.evaluate("tags => axe.run(document, {runOnly: {type: 'tag', values: tags}})", AXE_TAGS)
    return [(v["id"], v["impact"], [n["target"] for n in v["nodes"]]) for v in result["violations"]]


# Records, in window.spoken, the text each change adds to a live region: what
# a screen reader would say.
RECORD_SPOKEN = """
window.spoken = [];
const LIVE = '[aria-live]:not([aria-live="off"]), [role="log"], [role="status"], [role="alert"]';
const observer = new MutationObserver(records => {
  for (const r of records) {
    const target = r.target.nodeType === Node.ELEMENT_NODE ? r.target : r.target.parentElement;
    if (!target || !target.closest(LIVE)) continue;
    if (r.type === "characterData") window.spoken.push(r.target.data);
    for (const node of r.addedNodes) if (node.textContent.trim()) window.spoken.push(node.textContent);
  }
});
// From when the page is parsed: what the page comes with is read as the page, not announced.
document.addEventListener("DOMContentLoaded", () =>
  observer.observe(document, {subtree: true, childList: true, characterData: true}));
"""


def spoken(page):
    return page.evaluate("window.spoken")


def test_only_what_arrives_now_is_announced_and_a_burst_as_a_count(start, new_context):
    from playwright.sync_api import expect
    srv = start("--history", "20", "--post-burst", "1000", "--poll-timeout", "20")
    for n in range(100):
        srv.post({"nick": "past", "body": f"old {n}"})
    page = new_context(RECORD_SPOKEN, viewport={"width": 1280, "height": 720}).new_page()
    polls = hold(page, "**/chat/updates*", is_poll)
    page.goto(f"http://127.0.0.1:{srv.port}/")
    # The history, the pages before it, "Loading…" and "The beginning": all the past.
    for count in (20, 70, 100):
        expect(page.locator("#messages .message")).to_have_count(count)
        page.evaluate("document.getElementById('messages').scrollTop = 0")
    expect(page.locator("#messages .past")).to_have_text("The beginning")
    # A gap filled from the store: 30 posted while the poll is held, past the 20 the server's memory keeps.
    dispatched(page, lambda: polls)
    for n in range(30):
        srv.post({"nick": "past", "body": f"missed {n}"})
    polls[0].continue_()
    expect(page.locator("#messages .message")).to_have_count(130)
    expect(page.locator("#messages .gap")).to_have_count(0)
    # A message that arrives now: said once, with its nick.
    dispatched(page, lambda: len(polls) == 2)
    polls[1].continue_()
    srv.post({"nick": "bob", "body": "hello now"})
    expect(page.locator("#heard")).to_have_text("bob: hello now")
    # A burst, in one answer: a count.
    dispatched(page, lambda: len(polls) == 3)
    for n in range(12):
        srv.post({"nick": "bob", "body": f"burst {n}"})
    polls[2].continue_()
    expect(page.locator("#heard")).to_have_text("12 new messages")
    assert spoken(page) == ["Live", "bob: hello now", "12 new messages"], spoken(page)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_chat_page_has_no_axe_violations_in_any_state(start, new_context, scheme):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "20")
    url = f"http://127.0.0.1:{srv.port}/"
    page = new_context(nicked("alice"), RECORD_SPOKEN, bypass_csp=True, color_scheme=scheme).new_page()
    page.goto(url)
    expect(page.locator("#messages .past")).to_have_text("No messages yet. Write the first one below.")
    assert axe(page) == [], "an empty room"
    srv.post({"nick": "bob", "body": "hello, see https://example.com/a"})
    send(page, "hi bob")
    expect(page.locator("#messages .message")).to_have_count(2)
    assert axe(page) == [], "messages"
    other = new_context(nicked("bob"), color_scheme=scheme).new_page()
    other.goto(url)
    expect(page.locator("#here")).to_have_text("Here: alice, bob")
    assert axe(page) == [], "the presence line"
    assert not any("Here" in text for text in spoken(page))     # who comes and goes is not read out
    send(page, "bell \x07 character")
    expect(page.locator("#notice")).to_be_visible()
    assert axe(page) == [], "a refused post"


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_the_feed_page_flowing_and_paused_by_keyboard_has_no_axe_violations_and_says_nothing(
        feed_setup, new_context, scheme):
    from playwright.sync_api import expect
    srv, feeds = feed_setup
    srv.wait_for(lambda s: sum(f["entries"] for f in s["feeds"]) == 5)
    page = new_context(RECORD_SPOKEN, bypass_csp=True, color_scheme=scheme).new_page()
    page.goto(f"http://{srv.host}:{srv.port}/feed?pace=100")
    expect(page.locator("#entries .entry")).to_have_count(5)
    feeds.feed("/a.xml", atom(numbered(1, 4) + HOSTILE_ENTRIES, title="Fixture Atom"))
    expect(page.locator("#entries .title").first).to_have_text("Entry 4", timeout=10000)
    expect(page.locator("#feeds")).to_contain_text("HTTP 500")
    assert axe(page) == [], "flowing"
    # Paused from the keyboard alone: Tab to the button, Enter; resumed with Space.
    for _ in range(10):
        if page.evaluate("document.activeElement.id") == "pace":
            break
        page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#pace")).to_have_text("Paused")
    assert axe(page) == [], "paused"
    page.keyboard.press(" ")
    expect(page.locator("#pace")).to_have_text("Live")
    assert spoken(page) == ["Live"], spoken(page)      # the stream itself is never read out


# The focused element's ring, and the first opaque background behind it (what the ring is drawn on).
FOCUS_RING = """() => {
  const e = document.activeElement, style = getComputedStyle(e);
  let behind = e.parentElement, bg = "";
  for (; behind; behind = behind.parentElement) {
    bg = getComputedStyle(behind).backgroundColor;
    if (bg !== "rgba(0, 0, 0, 0)" && bg !== "transparent") break;
  }
  return {name: e.id || e.tagName + " " + e.textContent.slice(0, 30), style: style.outlineStyle,
          width: parseFloat(style.outlineWidth), color: style.outlineColor, bg};
}"""


def luminance(css):
    """WCAG's relative luminance of a CSS rgb() colour: 0 for black, 1 for white."""
    r, g, b = (int(c) / 255 for c in re.findall(r"\d+", css)[:3])
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in (r, g, b))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b):
    """WCAG's contrast ratio of two CSS rgb() colours."""
    light, dark = sorted((luminance(a), luminance(b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_control_shows_a_focus_ring_of_3_to_1_and_dark_mode_is_dark(feed_setup, new_context, scheme):
    from playwright.sync_api import expect
    srv, feeds = feed_setup
    srv.post({"nick": "bob", "body": "a link: https://example.com/a"})
    context = new_context(color_scheme=scheme)
    for path, ready, controls in (("/", "#messages .message", {"messages", "nick", "body"}),
                                  ("/feed?pace=100", "#entries a.title", {"pace"})):
        page = context.new_page()
        page.goto(f"http://{srv.host}:{srv.port}{path}")
        expect(page.locator(ready).first).to_be_visible()
        for part in ("document.documentElement", "document.querySelector('.bar')"):     # the page and its cards
            assert (luminance(page.evaluate(f"getComputedStyle({part}).backgroundColor")) < 0.05) == (scheme == "dark")
        rings = []
        for _ in range(40):                     # every control, by the keyboard, round to the first again
            page.keyboard.press("Tab")
            ring = page.evaluate(FOCUS_RING)
            if rings and ring["name"] == rings[0]["name"]:
                break
            if not ring["name"].startswith("BODY"):     # past the last control, before the first
                rings.append(ring)
        assert controls <= {ring["name"] for ring in rings}, rings
        for ring in rings:
            assert ring["style"] not in ("none", "auto") and ring["width"] >= 2, ring
            assert contrast(ring["color"], ring["bg"]) >= 3, ring


def test_reduced_motion_stops_the_feeds_slide_and_the_reconnecting_blink(feed_setup, new_context):
    from playwright.sync_api import expect
    srv, feeds = feed_setup
    for motion, slide, blink in (("no-preference", "arrive", "blink"), ("reduce", "none", "none")):
        page = new_context(reduced_motion=motion).new_page()
        # The history comes; every poll after it fails, and the page says it is reconnecting.
        page.route("**/feed/updates*", lambda route: route.abort() if is_poll(route.request.url) else route.continue_())
        page.goto(f"http://{srv.host}:{srv.port}/feed")
        expect(page.locator("#entries .entry").first).to_be_visible()
        assert page.locator("#entries .entry").first.evaluate("e => getComputedStyle(e).animationName") == slide
        expect(page.locator("#state")).to_have_text("Reconnecting…")
        assert page.locator("#state").evaluate("e => getComputedStyle(e, '::before').animationName") == blink


def test_a_chat_page_back_from_the_back_forward_cache_goes_on(start, browser):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "5")
    # Playwright's browsers have the cache turned off; this one keeps it, as browsers do.
    cached = browser.browser_type.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                                         args=CHROMIUM_ARGS, ignore_default_args=["--disable-back-forward-cache"])
    try:
        page = cached.new_page()
        page.add_init_script("addEventListener('pageshow', event => { window.restored = event.persisted; });")
        page.goto(f"http://127.0.0.1:{srv.port}/")
        expect(page.locator("#state")).to_have_text("Live")
        srv.post({"nick": "bob", "body": "before leaving"})
        expect(page.locator("#messages .text")).to_have_text(["before leaving"])
        page.goto(f"http://127.0.0.1:{srv.port}/feed")
        page.go_back(wait_until="commit")       # a page from the cache is shown again, not loaded
        page.wait_for_function("window.restored === true", timeout=5000)
        srv.post({"nick": "bob", "body": "after coming back"})
        expect(page.locator("#messages .text")).to_have_text(["before leaving", "after coming back"], timeout=20000)
        expect(page.locator("#state")).to_have_text("Live")
    finally:
        cached.close()


def test_both_pages_reflow_at_320_px_without_sideways_scrolling(feed_setup, open_page):
    from playwright.sync_api import expect
    srv, feeds = feed_setup
    srv.post({"nick": "a-rather-long-nick-name", "body": "https://example.com/" + "a-very-long-path/" * 8})
    for path, ready in (("/", "#messages .message"), ("/feed", "#entries .entry")):
        page = open_page(f"http://{srv.host}:{srv.port}{path}", viewport={"width": 320, "height": 640})
        expect(page.locator(ready).first).to_be_visible()
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 320


def readme_nginx_block(upstream=False):
    """docs/running.md's nginx block for one process, or with `upstream` the one for several."""
    blocks = re.findall(r"```nginx\n(.*?)```", (HERE / "docs" / "running.md").read_text(encoding="utf-8"), re.S)
    return next(b for b in blocks if ("upstream " in b) == upstream)


@pytest.fixture
def nginx(tmp_path):
    """Start Debian's nginx with docs/running.md's own configuration; return a function
    that takes the app's port (or its processes' ports) and gives the proxy's."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if not binary:
        missing("nginx is not installed (apt-get install nginx)")
    procs = []
    # Where nginx's workers (user nobody, when started as root) write request bodies
    # too big for memory: tmp_path is private to the tests' user, this is not.
    scratch = tempfile.TemporaryDirectory(prefix="longpoll-nginx-")
    buffers = scratch.name
    os.chmod(buffers, 0o755)

    def run(*app_ports):
        port = free_port()                  # a free, non-default port for the proxy
        # The block unchanged but for its ports (and the proxy kept on loopback).
        if len(app_ports) == 1:
            block = readme_nginx_block()
            assert "http://127.0.0.1:8080;" in block
            block = block.replace("http://127.0.0.1:8080;", f"http://127.0.0.1:{app_ports[0]};")
        else:
            block = readme_nginx_block(upstream=True)
            for readme_port, app_port in zip((8081, 8082), app_ports, strict=True):
                assert f"server 127.0.0.1:{readme_port};" in block
                block = block.replace(f"server 127.0.0.1:{readme_port};", f"server 127.0.0.1:{app_port};")
        assert "listen 8000;" in block
        block = block.replace("listen 8000;", f"listen 127.0.0.1:{port};")
        temp = "\n".join(f"{kind}_temp_path {buffers}/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (tmp_path / "nginx.conf").write_text(
            f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
            f"events {{}}\nhttp {{\naccess_log off;\n{temp}\n{block}\n}}\n")
        procs.append(subprocess.Popen(
            [binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return port
            except OSError:
                assert procs[-1].poll() is None, procs[-1].stderr.read()
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
    yield run
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)
    scratch.cleanup()


def test_chat_through_the_readme_nginx_config(start, open_page, nginx):
    from playwright.sync_api import expect
    app = start("--trusted-proxy", "127.0.0.1", "--poll-timeout", "5")
    url = f"http://127.0.0.1:{nginx(app.port)}/"
    alice, bob = open_page(url), open_page(url)
    expect(bob.locator("#state")).to_have_text("Live")
    alice.fill("#nick", "alice")
    send(alice, "through the proxy")
    expect(bob.locator("#messages .text")).to_have_text(["through the proxy"], timeout=2000)
    expect(alice.locator("#notice")).to_be_hidden()
    # Both pages' next polls park through the proxy (they go out once the message is shown).
    app.wait_for(lambda s: s["streams"]["chat"]["waiting"] == 2)


def test_the_readme_proxy_passes_no_clients_own_forwarded_host(start, nginx):
    import http.client
    app = start("--trusted-proxy", "127.0.0.1")
    port = nginx(app.port)

    def post(headers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/chat/messages", body='{"body": "hi"}',
                     headers={"Content-Type": "application/json", **headers})
        return conn.getresponse().status
    # A page of evil.example names itself in Origin, and in X-Forwarded-Host to match.
    assert post({"Origin": "http://evil.example", "X-Forwarded-Host": "evil.example"}) == 403
    assert post({"Origin": f"http://127.0.0.1:{port}"}) == 201     # the site itself, through the proxy


def test_a_hub_pushes_through_the_readme_nginx_config(start, nginx):
    hub, feeds = Hub(), FeedServer()
    try:
        app_port = free_port()
        proxy = nginx(app_port)         # the app's public URL is the proxy's
        # A big feed: over nginx's default limit of 1 MB for a request body.
        padding = [(f"urn:pad{n}", f"Pad {n}", "http://example.com/", "x" * 100_000) for n in range(20)]
        topic = feeds.feed("/feed.xml", hubbed(numbered(1, 1) + padding, hub.url))
        app = start("--port", str(app_port), "--trusted-proxy", "127.0.0.1", "--public-url",
                    f"http://127.0.0.1:{proxy}", "--feed", topic, "--feed-interval", "300")
        hub.wait(lambda h: h.subs)      # verified through the proxy
        app.wait_for(lambda s: s["feeds"][0]["push"]["state"] == "pushed" and s["streams"]["feed"]["last_id"])
        cursor = app.cursor("feed")
        # Its next version, sent chunked as some hubs do: nginx passes it on whole,
        # with a Content-Length, and its bytes as signed.
        big = hubbed(numbered(1, 2) + padding, hub.url)
        assert len(big) > 2_000_000 and hub.push(topic, big, chunked=True) == 202
        got = app.get(f"/feed/updates?cursor={cursor}").json()["entries"]
        assert [e["title"] for e in got] == ["Entry 2"]
    finally:
        hub.close()
        feeds.close()


def test_chat_through_the_readme_deployment_while_a_process_dies(start, open_page, nginx, redis_url):
    from playwright.sync_api import expect
    apps = [start("--redis", redis_url, "--trusted-proxy", "127.0.0.1", "--poll-timeout", "5") for _ in range(2)]
    for app in apps:
        app.wait_for(lambda s: s["storage"]["ok"])
    url = f"http://127.0.0.1:{nginx(*(app.port for app in apps))}/"
    alice, bob = open_page(url), open_page(url)
    for page in (alice, bob):
        expect(page.locator("#state")).to_have_text("Live")
    send(alice, "one")
    expect(bob.locator("#messages .text")).to_have_text(["one"], timeout=2000)
    # SIGKILL a process with polls parked: they fail, and the pages carry on through the other.
    deadline = time.monotonic() + 10
    while not any(app.status()["waiting"] for app in apps):     # the pages' next polls, once "one" is shown
        assert time.monotonic() < deadline, "no poll parked"
        time.sleep(0.05)
    victim = max(apps, key=lambda app: app.status()["waiting"])
    victim.proc.kill()
    send(bob, "two")
    # Stored before the next is sent: a POST that met the killed process is retried
    # (after 0.5-1 s), and a later one could be given the smaller id meanwhile.
    expect(bob.locator("#messages .text")).to_have_text(["one", "two"], timeout=10000)
    send(alice, "three")
    for page in (alice, bob):
        expect(page.locator("#messages .text")).to_have_text(["one", "two", "three"], timeout=10000)
        expect(page.locator("#notice")).to_be_hidden()


# -- Many tabs in one browser --------------------------------------------------
# Only pages of one browser context share a connection pool (six per host) and
# Web Locks, as the tabs of one browser profile do.

NO_WEB_LOCKS = "delete Navigator.prototype.locks;"
# A tab is hidden unless its address ends in #shown; window.reveal() shows it.
VISIBILITY = """
window.__shown = location.hash === "#shown";
Object.defineProperty(document, "visibilityState", {get: () => window.__shown ? "visible" : "hidden"});
Object.defineProperty(document, "hidden", {get: () => !window.__shown});
window.reveal = () => { window.__shown = true; document.dispatchEvent(new Event("visibilitychange")); };
"""


@pytest.fixture
def tabs(new_context):
    """One browser context; tabs(base, paths) opens a tab for each path, each
    within 3 s, and returns them."""
    from playwright.sync_api import expect

    def open_tabs(base, paths, *init_scripts):
        context = new_context(*init_scripts)
        pages = []
        for path in paths:
            page = context.new_page()
            started = time.monotonic()
            page.goto(base + path)
            expect(page.locator("#state")).to_have_text("Live", timeout=3000)
            assert time.monotonic() - started < 3, f"{path} took {time.monotonic() - started:.1f} s"
            pages.append(page)
        return pages
    return open_tabs


TIMED_POST = """async body => {
  const started = performance.now();
  const res = await fetch("/chat/messages", {method: "POST", body: JSON.stringify({nick: "tab", body}),
                                             headers: {"Content-Type": "application/json"}});
  return [res.status, performance.now() - started];
}"""


def parked(srv):
    streams = srv.status()["streams"]
    return streams["chat"]["waiting"], streams["feed"]["waiting"]


def test_eight_tabs_share_one_poll_per_stream_and_posts_never_wait(start, tabs):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "20")
    pages = tabs(f"http://127.0.0.1:{srv.port}", ["/", "/feed"] * 5)
    chats = pages[0::2]
    srv.wait_for(lambda s: parked(srv) == (1, 1))
    status, ms = chats[3].evaluate(TIMED_POST, "timed from a tab")
    assert status == 201 and ms < 1000, ms
    send(chats[4], "typed in the last tab")
    for page in chats:
        expect(page.locator("#messages .text")).to_have_text(
            ["timed from a tab", "typed in the last tab"], timeout=2000)
    srv.wait_for(lambda s: parked(srv) == (1, 1))     # the leaders' next polls, once they have shown it
    assert sum(p.locator("#state").get_attribute("data-role") == "leader" for p in pages) == 2


def leaders(pages):
    return [p for p in pages if p.locator("#state").get_attribute("data-role") == "leader"]


def test_closing_or_reloading_the_leader_stalls_nothing_and_repeats_nothing(start, tabs):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "20")
    chats = tabs(f"http://127.0.0.1:{srv.port}", ["/"] * 4 + ["/feed"] * 2)[:4]
    srv.post({"body": "before the close"})
    for page in chats:
        expect(page.locator("#messages .text")).to_have_text(["before the close"], timeout=2000)
    [leader] = leaders(chats)
    chats.remove(leader)
    # The next leader's first poll goes on from the last item it showed: none skipped.
    last_shown = srv.status()["streams"]["chat"]["last_id"]
    polled = []
    for page in chats:
        page.on("request", lambda r: polled.append(r.url) if "/chat/updates?" in r.url else None)
    leader.close()
    dispatched(chats[0], lambda: polled)
    assert re.search(rf"\?cursor={last_shown}(&|$)", polled[0]), polled
    srv.post({"body": "just after the close"})
    for page in chats:
        expect(page.locator("#messages .text")).to_have_text(
            ["before the close", "just after the close"], timeout=3000)
    srv.wait_for(lambda s: parked(srv) == (1, 1), timeout=5)
    [leader] = leaders(chats)
    leader.reload()
    srv.post({"body": "after the reload"})
    for page in chats:
        expect(page.locator("#messages .text")).to_have_text(
            ["before the close", "just after the close", "after the reload"], timeout=3000)
    srv.wait_for(lambda s: parked(srv) == (1, 1), timeout=5)
    # A late tab shows the history at once.
    late = tabs(f"http://127.0.0.1:{srv.port}", ["/"])[0]
    expect(late.locator("#messages .text")).to_have_text(
        ["before the close", "just after the close", "after the reload"])
    expect(late.locator("#messages .gap")).to_have_count(0)


# Every role a tab takes, in order, in window.roles.
ROLES = """
window.roles = [];
new MutationObserver(() => {
  const role = document.getElementById("state").dataset.role;
  if (role !== window.roles[window.roles.length - 1]) window.roles.push(role);
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["data-role"]});
"""


def test_a_live_leader_keeps_the_lead_through_many_empty_polls(start, tabs):
    srv = start("--poll-timeout", "2")
    chats = tabs(f"http://127.0.0.1:{srv.port}", ["/"] * 3, ROLES)
    [leader] = leaders(chats)
    answered = []
    leader.on("response", lambda r: answered.append(r) if "/chat/updates?cursor=" in r.url else None)
    # Five empty polls of 2 s: a follower that took the silence of one for a
    # frozen leader (it is 2 + 10 s) would have stolen the lock by now.
    dispatched(leader, lambda: len(answered) >= 5, timeout=20)
    assert leader.evaluate("window.roles") == ["follower", "leader"]     # elected once, never since
    for page in chats:
        if page is not leader:
            assert page.evaluate("window.roles") == ["follower"]
    srv.wait_for(lambda s: parked(srv)[0] == 1)      # one chat poll parked: the leader's (between polls, none)


# Every batch a page's channels hear, as [channel name, the lists it holds].
HEARD = """
window.heard = [];
window.RealChannel = BroadcastChannel;
window.BroadcastChannel = class extends window.RealChannel {
  constructor(name) {
    super(name);
    this.addEventListener("message", ({data}) => {
      if (data.batch) window.heard.push([name, Object.keys(data.batch).filter(k => k !== "cursor")]);
    });
  }
};
"""


def test_a_chat_broadcast_reaches_only_the_chat_tabs(start, tabs):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "20")
    chat, _, feed = tabs(f"http://127.0.0.1:{srv.port}", ["/", "/", "/feed"], HEARD)
    # A probe on the chat's channel, in the feed tab: once it has heard the
    # chat's batch, the feed tab's own channel would have too, if it were the same.
    feed.evaluate("""() => { window.probe = [];
        new RealChannel("longpoll /chat/updates").onmessage = ({data}) => window.probe.push(data); }""")
    srv.post({"body": "for the chat tabs"})
    expect(chat.locator("#messages .text")).to_have_text(["for the chat tabs"], timeout=2000)
    dispatched(feed, lambda: feed.evaluate("window.probe.some(m => m.batch)"))
    assert ["longpoll /chat/updates", ["messages"]] not in feed.evaluate("window.heard")
    assert ["longpoll /chat/updates", ["messages"]] in (chat.evaluate("window.heard") +
                                                         _.evaluate("window.heard"))
    expect(feed.locator("#entries .entry")).to_have_count(0)


def test_a_frozen_leader_is_taken_over_by_a_visible_tab(start, tabs):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "2")
    chats = tabs(f"http://127.0.0.1:{srv.port}", ["/"] * 3, ROLES)
    [leader] = leaders(chats)
    followers = [p for p in chats if p is not leader]
    # Frozen as a background tab is: no script runs, and it keeps its lock.
    cdp = leader.context.new_cdp_session(leader)
    cdp.send("Debugger.enable")
    cdp.send("Debugger.pause")
    srv.post({"body": "while the leader is frozen"})
    for page in followers:    # silence of 2 + 10 s, then a follower steals the lock and polls
        expect(page.locator("#messages .text")).to_have_text(["while the leader is frozen"], timeout=20000)
    assert len(leaders(followers)) == 1
    cdp.send("Debugger.resume")
    expect(leader.locator("#state")).to_have_attribute("data-role", "follower", timeout=5000)
    srv.post({"body": "after it woke"})
    for page in chats:
        expect(page.locator("#messages .text")).to_have_text(
            ["while the leader is frozen", "after it woke"], timeout=5000)
    # Two of the new leader's empty polls later, the woken tab still follows:
    # silent while frozen, it must not take the lock straight back.
    [new_leader] = leaders(followers)
    answered = []
    new_leader.on("response", lambda r: answered.append(r) if "/chat/updates?cursor=" in r.url else None)
    dispatched(new_leader, lambda: len(answered) >= 2, timeout=15)
    assert leader.evaluate("window.roles") == ["follower", "leader", "follower"]


def test_without_web_locks_only_visible_tabs_poll(start, tabs):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "20")
    pages = tabs(f"http://127.0.0.1:{srv.port}", ["/#shown", "/feed#shown"] + ["/", "/feed"] * 3,
                 NO_WEB_LOCKS, VISIBILITY)
    assert pages[0].evaluate("navigator.locks") is None
    srv.wait_for(lambda s: parked(srv) == (1, 1))
    hidden_chat = pages[2]
    status, ms = hidden_chat.evaluate(TIMED_POST, "from a hidden tab")
    assert status == 201 and ms < 1000, ms
    expect(pages[0].locator("#messages .text")).to_have_text(["from a hidden tab"], timeout=2000)
    hidden_chat.evaluate("window.reveal()")
    expect(hidden_chat.locator("#messages .text")).to_have_text(["from a hidden tab"], timeout=2000)
    srv.wait_for(lambda s: parked(srv) == (2, 1))             # now two visible chat tabs poll
    srv.post({"body": "after it was shown"})                  # and both pass it to every tab
    for page in pages[0::2]:
        expect(page.locator("#messages .text")).to_have_text(
            ["from a hidden tab", "after it was shown"], timeout=2000)
    pages[0].wait_for_timeout(500)          # every copy of the broadcast has landed: still once each
    for page in pages[0::2]:
        expect(page.locator("#messages .text")).to_have_text(["from a hidden tab", "after it was shown"])


def test_a_tab_that_missed_a_broadcast_while_loading_catches_up(start, tabs):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "20")
    srv.post({"body": "already there"})
    [leader] = tabs(f"http://127.0.0.1:{srv.port}", ["/"])
    late = leader.context.new_page()
    held = []
    late.route("**/chat/updates*", lambda route: route.continue_() if held else held.append(route))
    late.goto(f"http://127.0.0.1:{srv.port}/")
    dispatched(late, lambda: held)              # the route handler runs when Playwright gets to it
    history = held[0].fetch()                   # the history, from before the message below
    srv.post({"body": "sent while the new tab loads"})
    expect(leader.locator("#messages .text")).to_have_text(["already there", "sent while the new tab loads"])
    held[0].fulfill(response=history)           # the new tab had no cursor when the leader told it
    # It catches up at once, not only when the next message comes; each once.
    expect(late.locator("#messages .text")).to_have_text(
        ["already there", "sent while the new tab loads"], timeout=3000)
    srv.post({"body": "the next one"})
    expect(late.locator("#messages .text")).to_have_text(
        ["already there", "sent while the new tab loads", "the next one"], timeout=3000)
    expect(late.locator("#messages .gap")).to_have_count(0)



class Relay:
    """A TCP relay to the app that can stop forwarding without closing anything,
    as a sleeping laptop's or a forgetful NAT's connections do."""

    def __init__(self, port):
        self.target, self.flowing, self.socks = port, threading.Event(), []
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client = self.listener.accept()[0]
            except OSError:
                return
            alive = self.flowing.is_set()   # a connection made while cut off never flows
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:                 # the app already stopped, as the test ends: nothing to relay to
                client.close()
                continue
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b, alive), daemon=True).start()

    def pump(self, src, dst, alive):
        try:
            while data := src.recv(65536):
                if not (alive and self.flowing.is_set()):
                    alive = False           # cut off: swallow everything, for good
                    continue
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for sock in self.socks:
            sock.close()


def test_a_dead_connection_is_noticed_and_the_page_recovers(start, open_page):
    from playwright.sync_api import expect
    srv = start("--poll-timeout", "2")
    relay = Relay(srv.port)
    try:
        page = open_page(f"http://127.0.0.1:{relay.port}/")
        expect(page.locator("#state")).to_have_text("Live")
        relay.flowing.clear()
        # The poll in flight never answers; its deadline (2 + 5 s) gives up on it.
        expect(page.locator("#state")).to_have_text("Reconnecting…", timeout=10000)
        srv.post({"body": "posted while cut off"})
        relay.flowing.set()                 # new connections flow again
        expect(page.locator("#messages .text")).to_have_text(["posted while cut off"], timeout=20000)
        expect(page.locator("#state")).to_have_text("Live")
    finally:
        relay.close()


def test_an_item_the_page_fails_on_is_skipped_and_nothing_is_shown_twice(chat_server, new_context):
    from playwright.sync_api import expect
    context = new_context()
    page = context.new_page()
    logged = []
    page.on("console", lambda m: m.type == "error" and logged.append(m.text))
    good = {"nick": "n", "time": 1764000000}
    batch = {"messages": [{"id": 1, "body": "first", **good},
                          {"id": 2, "body": "bad time", "nick": "n", "time": 1e20},   # an invalid date
                          {"id": 3, "body": "third", **good}], "cursor": 3}
    asked = []

    def answer(route):
        asked.append(route.request.url)
        if len(asked) <= 3:                 # the batch, for as long as it is asked for
            route.fulfill(json=batch)
        else:
            route.fulfill(json={"messages": [{"id": 4, "body": "fourth", **good}], "cursor": 4})
    page.route("**/chat/updates*", answer)
    page.goto(f"http://{chat_server.host}:{chat_server.port}/")
    expect(page.locator("#messages .text")).to_have_text(["first", "third", "fourth"], timeout=5000)
    assert "cursor=3" in asked[1]           # the cursor moved past the bad item
    assert any("skipped item 2" in text for text in logged), logged
