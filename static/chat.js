// The chat page: show each message as it arrives, and post new ones.
"use strict";

const messages = document.getElementById("messages");
const nick = document.getElementById("nick");
const body = document.getElementById("body");
const form = document.getElementById("compose");
const notice = document.getElementById("notice");
const KEEP = 500;   // messages kept on the page while the reader is at the bottom
const PAGE = 50;    // messages asked for at a time when scrolling back
const MISSED = "Some messages were missed while you were away.";
const EMPTY = "No messages yet. Write the first one below.";

nick.value = recall("longpoll.nick") || "";
nick.addEventListener("input", () => remember("longpoll.nick", nick.value.trim()));

// This browser, for who is here: one id for all its tabs, made once.
let browser = recall("longpoll.browser");
if (!/^[A-Za-z0-9_-]{8,64}$/.test(browser || "")) {
  browser = randomId();
  remember("longpoll.browser", browser);
}
// The nick the chat's polls carry: one the server would refuse is left out, so polling never stops for it.
const REFUSED_IN_NICK = /[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/;
const pollingNick = () => {
  const name = nick.value.trim();
  return name.length <= 32 && !REFUSED_IN_NICK.test(name) ? name : "";
};

// URLs in the text become links; everything else is added as plain text.
const URL_PATTERN = /https?:\/\/[^\s<>"]*[^\s<>"'.,;:!?)\]}]/g;
function linkify(parent, text) {
  let last = 0;
  for (const match of text.matchAll(URL_PATTERN)) {
    parent.append(text.slice(last, match.index));
    const a = el("a", "", match[0]);
    a.href = match[0];
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    parent.append(a);
    last = match.index + match[0].length;
  }
  parent.append(text.slice(last));
}

// Make a message's element; the caller puts it in its place.
function render(m) {
  const item = el("li", "message");
  item.dataset.id = m.id;
  if (m.nick === (nick.value.trim() || "anonymous")) item.classList.add("mine");
  const meta = el("div", "meta");
  meta.append(el("span", "nick", m.nick));
  const when = new Date(m.time * 1000);
  const time = el("time", "time", clockTime(when));
  time.dateTime = when.toISOString();
  time.title = when.toLocaleString();
  meta.append(time);
  const text = el("div", "text");
  linkify(text, m.body);
  item.append(meta, text);
  return item;
}

// The top of the log: "Loading…" while the page before it is fetched, "The
// beginning" once the store holds nothing older, and in an empty room what to do.
const past = el("li", "past");
past.hidden = true;
messages.append(past);
let oldest = null;          // id of the oldest message shown
let newest = null;          // id of the newest
let beginning = false;
let loading = false;

function mark(text) {
  past.textContent = text;
  past.hidden = !text;
}

// The one way into the log, whatever brought the messages (the first load, a
// poll, another tab's broadcast, scroll-back, a filled gap): an id already
// shown is skipped, and each goes in id order, so two paths that bring the same
// message, in either order, show it once and in its place. Returns those added.
function insert(list) {
  const added = [];
  each(list, m => {
    let next = null;        // the oldest shown message newer than m
    for (let node = messages.lastElementChild; node && node !== past; node = node.previousElementSibling) {
      if (!node.classList.contains("message")) continue;    // a gap notice stays where the hole is
      const id = Number(node.dataset.id);
      if (id === m.id) return;
      if (id < m.id) break;
      next = node;
    }
    messages.insertBefore(render(m), next);
    added.push(m);
  });
  return added;
}

// What arrives now is said once, by a hidden live region: the log is not one,
// or scroll-back and gap filling would be read out as news. Messages that come
// within half a second of each other are said as a count.
const heard = document.getElementById("heard");
let unsaid = [];
function announce(list) {
  if (!list.length) return;
  if (!unsaid.length) {
    setTimeout(() => {
      const [m] = unsaid;
      heard.replaceChildren(el("p", "", unsaid.length === 1 ? `${m.nick}: ${m.body}` : `${unsaid.length} new messages`));
      unsaid = [];
    }, 500);
  }
  unsaid.push(...list);
}

// A page of the chat's past, from the store (it keeps more than the polls serve).
async function pastPage(before, limit) {
  const query = before === null ? "" : `&before=${before}`;
  const res = await fetch(`/chat/messages?limit=${limit}${query}`, {cache: "no-store", headers: {Accept: "application/json"}});
  if (!res.ok) throw new Error("HTTP " + res.status);
  return res.json();
}

// Scrolled to the top: the page before the oldest shown goes above it, and the
// reader stays on the message they were reading.
async function loadOlder() {
  if (loading || beginning || messages.scrollTop > 40) return;
  loading = true;
  mark("Loading earlier messages…");
  try {
    const page = await pastPage(oldest, PAGE);
    const height = messages.scrollHeight;
    insert(page.messages);
    if (page.messages.length) oldest = page.messages[0].id;
    beginning = !page.more;
    messages.scrollTop += messages.scrollHeight - height;
    mark(!beginning ? "" : oldest === null ? EMPTY : "The beginning");
  } catch (err) {
    mark("");               // the next scroll to the top tries again
    return;
  } finally {
    loading = false;
  }
  loadOlder();              // a log still too short to scroll gets the page before too
}
messages.addEventListener("scroll", loadOlder);

// A poll that says it skipped messages (the browser was away longer than the
// server's memory): fill the hole from the store, and say only what it no longer holds.
async function fillGap(notice, after, before) {
  let found = [], reached = false, more = true;
  try {
    while (more && !reached) {
      const page = await pastPage(before, 200);
      reached = page.messages.some(m => m.id <= after);
      found = page.messages.filter(m => m.id > after).concat(found);
      more = page.more && page.messages.length > 0;
      if (page.messages.length) before = page.messages[0].id;
    }
  } catch (err) { /* what could not be fetched is said missed */ }
  insert(found);            // after the notice: it stays where the hole is, above what the store still had
  if (reached) notice.remove();
  else notice.textContent = MISSED;
}

longPoll("/chat/updates", "messages", (batch, gap, first) => {
  const atBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
  if (gap && newest !== null) {
    const notice = el("li", "gap", "Fetching what you missed…");
    messages.append(notice);
    fillGap(notice, newest, batch.length ? batch[0].id : null);
  }
  const added = insert(batch);
  if (!first && !gap) announce(added);      // the history, and catching up after a gap, are the past
  if (batch.length) {
    newest = batch[batch.length - 1].id;
    if (oldest === null) {
      oldest = batch[0].id;
      if (beginning) mark("The beginning");     // the empty room's first message
    }
  }
  if (atBottom) {
    // The reader is at the bottom: the top goes, and can be scrolled back to.
    const shown = messages.querySelectorAll(".message");
    for (let i = 0; i < shown.length - KEEP; i++) shown[i].remove();
    if (shown.length > KEEP) {
      oldest = Number(messages.querySelector(".message").dataset.id);
      beginning = false;
      mark("");
    }
  }
  if (atBottom || batch.some(m => m.nick === nick.value.trim())) {
    messages.scrollTop = messages.scrollHeight;
  }
  if (first) loadOlder();
}, () => ({browser, nick: pollingNick()}));

// Leaving: said at once, so the others see it within seconds. A reload, or
// another tab of this browser, polls again before it takes effect.
addEventListener("pagehide", () => {
  navigator.sendBeacon("/chat/leave", new Blob([JSON.stringify({browser})], {type: "application/json"}));
});

// Who is here: one tab per browser follows it (a Web Lock, as the polls do:
// a parked request holds one of the browser's few connections) and tells the
// others over a BroadcastChannel. Every tab asks once at start, which is answered at once.
const here = document.getElementById("here");
const hereChannel = typeof BroadcastChannel === "function" ? new BroadcastChannel("longpoll /presence") : null;

function showHere({here: nicks, count}) {
  const names = nicks.slice(0, 3);
  const more = count - names.length;
  const listed = names.join(", ") + (more ? ` and ${more} more` : "");
  here.textContent = count <= 1 ? "" : names.length ? `Here: ${listed}` : `${count} here`;
  here.hidden = count <= 1;         // quiet when only you are
}

async function presence(path) {
  const res = await fetch(path, {cache: "no-store", headers: {Accept: "application/json"}});
  if (!res.ok) throw new Error("HTTP " + res.status);
  return res.json();
}

async function followHere(active) {
  let cursor = null;
  while (active()) {
    try {
      const snapshot = await presence(cursor === null ? "/presence" : `/presence/updates?cursor=${cursor}`);
      cursor = snapshot.cursor;
      showHere(snapshot);
      if (hereChannel) hereChannel.postMessage(snapshot);
    } catch (err) {
      await new Promise(resolve => setTimeout(resolve, 2000 + Math.random() * 3000));
    }
  }
}

if (navigator.locks && hereChannel) {
  hereChannel.onmessage = ({data}) => showHere(data);
  presence("/presence").then(showHere, () => {});
  navigator.locks.request("longpoll /presence", () => followHere(() => true));
} else {
  // Without Web Locks (see poll.js), only visible tabs follow it.
  const visible = () => document.visibilityState === "visible";
  let following = false;
  const follow = async () => {
    if (following || !visible()) return;
    following = true;
    await followHere(visible);
    following = false;
  };
  document.addEventListener("visibilitychange", follow);
  follow();
}

function say(text) {
  notice.textContent = text;
  notice.hidden = !text;
}

function randomId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, b => b.toString(16).padStart(2, "0")).join("");
}

// Post a message. Network failures and server errors are retried with the same
// client_id, so the server posts it once even if an answer was lost.
async function post(text) {
  const payload = JSON.stringify({nick: nick.value.trim(), body: text, client_id: randomId()});
  let problem = "Not sent: the server cannot be reached. Try again.";
  for (let attempt = 1; ; attempt++) {
    let res = null;
    try {
      res = await fetch("/chat/messages", {
        method: "POST", body: payload,
        headers: {"Content-Type": "application/json", Accept: "application/json"},
      });
    } catch (err) { /* network error: retry below */ }
    if (res && res.ok) return null;
    if (res && res.status === 429) {
      const wait = res.headers.get("Retry-After") || "a few";
      return `You are sending messages too fast. Try again in ${wait} s.`;
    }
    if (res) {
      const data = await res.json().catch(() => ({}));
      const why = data.error ? `Not sent: ${data.error}.` : `Not sent (HTTP ${res.status}).`;
      if (res.status < 500) return why;
      // A 5xx is retried; if it says why (503: messages cannot be stored just now), that is the last word.
      if (data.error) problem = why;
    }
    if (attempt === 5) return problem;
    await new Promise(resolve => setTimeout(resolve, 500 * 2 ** attempt * (0.5 + Math.random() / 2)));
  }
}

// Messages typed one after another are posted one after another: sent at
// once, the second could reach the server first and be shown above the first.
let posting = Promise.resolve(null);

form.addEventListener("submit", async event => {
  event.preventDefault();
  const text = body.value;
  if (!text.trim()) return;
  body.value = "";
  fit();
  say("");
  const problem = await (posting = posting.then(() => post(text)));
  if (problem) {
    if (!body.value) { body.value = text; fit(); }
    say(problem);
  }
});

body.addEventListener("keydown", event => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

// Grow the message box with its text, up to a few lines.
function fit() {
  body.style.height = "auto";
  body.style.height = Math.min(body.scrollHeight, 160) + "px";
}
body.addEventListener("input", fit);
body.focus();
