// The long-poll loop both pages share, and a few small DOM helpers.
"use strict";

// A browser opens at most six HTTP/1.1 connections to a host, shared by every
// tab, and a parked poll holds one. So one tab per stream polls -- the leader,
// elected with a Web Lock -- and passes each batch to the other tabs over a
// BroadcastChannel. Without Web Locks (a plain-http page on a LAN address is
// not a secure context) only visible tabs poll; hidden ones catch up when shown.
const POLL_TIMEOUT_MS = 1000 * Number(document.body.dataset.pollTimeout || 25);
// A poll still unanswered this long after the server's own timeout went down a
// dead connection (a laptop that slept, a NAT that forgot us): give up on it.
const DEADLINE_MS = POLL_TIMEOUT_MS + 5000;
// A leader silent for this long is frozen (a frozen tab keeps its lock): it
// speaks at least once a poll timeout, and every few seconds while retrying.
const SILENCE_MS = POLL_TIMEOUT_MS + 10000;

// Follow the stream at `url`: call onBatch(items, gap, first) with the items
// this tab has not shown yet (`key` names the list in the server's answers),
// each once and in id order, forever. `extra()` gives more query parameters
// for each poll (the chat's: who polls).
function longPoll(url, key, onBatch, extra = () => ({})) {
  let cursor = null;            // the newest id this tab has shown
  let shown = false;            // whether the first batch (the history) has been shown
  let term = 0;                 // changes when this tab stops leading, which ends its loop
  let leading = false;
  let queued = null;            // aborts this tab's waiting lock request
  let inFlight = null;          // aborts this tab's poll in flight
  let heard = Date.now();       // when the server or the leader last spoke to this tab
  let catchingUp = false;
  let toldWhileLoading = null;  // the newest cursor a leader passed on before our history came
  let again = false;            // this tab's poll was ended on purpose, to poll anew at once
  const channel = typeof BroadcastChannel === "function" ? new BroadcastChannel("longpoll " + url) : null;
  const state = document.getElementById("state");

  function setState(name, text) {
    state.dataset.state = name;
    if (state.textContent !== text) state.textContent = text;   // a live region: each poll must not say "Live" again
  }

  // One request. With `wait`, it sends our cursor, and the server holds it
  // until there is news or its poll timeout passes; without, it answers at once.
  async function ask(wait) {
    const controller = new AbortController();
    inFlight = controller;
    const deadline = setTimeout(() => controller.abort(), DEADLINE_MS);
    const sent = wait ? cursor : null;
    try {
      const params = new URLSearchParams(sent !== null ? {cursor: sent, ...extra()} : extra());
      const query = params.toString() ? "?" + params : "";
      const res = await fetch(url + query, {
        cache: "no-store", headers: {Accept: "application/json"}, signal: controller.signal});
      if (!res.ok) {
        const error = new Error("HTTP " + res.status);
        error.retryAfter = Number(res.headers.get("Retry-After")) || 0;
        throw error;
      }
      return {batch: await res.json(), sent};
    } finally {
      clearTimeout(deadline);
    }
  }

  // Hand the page what it has not shown, in id order, each item once. The
  // cursor moves past the items before the page sees them, so a batch the
  // page fails on is never handed over twice.
  function show(items, gap) {
    const fresh = items.filter(item => cursor === null || item.id > cursor);
    if (fresh.length) cursor = fresh[fresh.length - 1].id;
    const first = !shown;
    shown = true;
    onBatch(fresh, gap, first);
  }

  // The server's answer to this tab's own request.
  function fromServer({batch, sent}) {
    heard = Date.now();
    const items = batch[key];
    let gap = Boolean(batch.gap);
    if (sent !== null && batch.cursor < sent) {
      cursor = null;            // a server that never issued our ids: start over, and say so
      gap = true;
    }
    if (cursor !== null && items.length && items[0].id > cursor + 1) gap = true;   // history fetched to catch up
    show(items, gap);
    cursor = Math.max(cursor === null ? batch.cursor : cursor, batch.cursor);
  }

  // A batch another tab polled. One that starts past our cursor means we
  // missed one (we were still loading when it came): one request catches up.
  function fromLeader(batch) {
    heard = Date.now();
    if (cursor === null) {                  // our first answer is on its way; it may predate this
      toldWhileLoading = Math.max(toldWhileLoading ?? batch.cursor, batch.cursor);
      return;
    }
    const fresh = batch[key].filter(item => item.id > cursor);
    const next = fresh.length ? fresh[0].id : batch.cursor + 1;
    if (next > cursor + 1 && !batch.gap) return catchUp();
    show(fresh, next > cursor + 1);
    cursor = Math.max(cursor, batch.cursor);
  }

  async function catchUp() {
    if (catchingUp) return;
    catchingUp = true;
    try {
      fromServer(await ask(false));
    } catch (err) { /* the leader keeps polling; its next batch tries again */ }
    catchingUp = false;
  }

  function tell(message) {
    if (channel) channel.postMessage(message);
  }

  if (channel) {
    channel.onmessage = ({data}) => {
      if (data.state) {
        heard = Date.now();
        setState(data.state, data.text);
      }
      if (data.batch) fromLeader(data.batch);
      // Another tab went away (and may have said its browser left): the leader's
      // parked poll began before that, so a new one says the browser is still here.
      // A moment later, so that the closing tab's last word arrives first.
      if (data.repoll && leading && inFlight) setTimeout(() => { again = true; inFlight.abort(); }, 250);
    };
  }
  addEventListener("pagehide", () => tell({repoll: true}));

  // Poll while active() holds. Each answer starts the next request straight
  // from the fetch's promise, not from a timer, which hidden tabs throttle.
  async function pollWhile(active) {
    let failures = 0;
    while (active()) {
      try {
        const answer = await ask(true);
        failures = 0;
        again = false;
        setState("live", "Live");
        tell({state: "live", text: "Live", batch: answer.batch});
        fromServer(answer);
      } catch (err) {
        if (!active()) break;   // stopped on purpose: hidden, or another tab took over
        if (again) {            // ended on purpose, to poll anew
          again = false;
          continue;
        }
        failures += 1;
        setState("reconnecting", "Reconnecting…");
        // Exponential backoff with jitter and a cap: a restarted server is not
        // stampeded by every browser at the same instant. A server that said
        // when to come back (429, 503) is not asked sooner.
        const ceiling = Math.min(30000, 500 * 2 ** Math.min(failures, 6));
        const delay = Math.max(ceiling / 2 + Math.random() * ceiling / 2, 1000 * (err.retryAfter || 0));
        const until = Date.now() + delay;
        while (active() && Date.now() < until) {
          tell({state: "reconnecting", text: "Reconnecting…"});  // still here, so nobody takes over
          await new Promise(resolve => setTimeout(resolve, Math.min(5000, until - Date.now())));
        }
      }
    }
  }

  // Ask for the lock and lead once it is ours. A closed, reloaded or
  // discarded tab releases it; the next tab in line resumes from its own cursor.
  function campaign(steal) {
    if (queued) queued.abort();
    queued = steal ? null : new AbortController();
    const mine = ++term;
    const options = steal ? {steal: true} : {signal: queued.signal};
    navigator.locks.request("longpoll " + url, options, async () => {
      leading = true;
      state.dataset.role = "leader";
      await pollWhile(() => term === mine);
    }).catch(() => { /* taken from us, or our request withdrawn */ }).finally(() => {
      if (term !== mine) return;            // withdrawn for a newer request
      leading = false;                      // taken from us (we were frozen): follow again
      heard = Date.now();                   // else, silent while frozen, we would steal it straight back
      state.dataset.role = "follower";
      term += 1;
      if (inFlight) inFlight.abort();
      campaign(false);
    });
  }

  async function start() {
    // Every tab first gets the history: with no cursor yet, the server answers at once.
    await pollWhile(() => !shown);
    // A batch the leader passed on while our history was on its way was not
    // shown: if it went past the history, catch up now, not at the next item.
    if (toldWhileLoading !== null && toldWhileLoading > cursor) catchUp();
    if (navigator.locks && channel) {
      state.dataset.role = "follower";
      campaign(false);
      // A visible follower takes over from a leader that has gone silent.
      setInterval(() => {
        if (!leading && document.visibilityState === "visible" && Date.now() - heard > SILENCE_MS) {
          heard = Date.now();
          campaign(true);
        }
      }, 1000);
    } else {
      const visible = () => document.visibilityState === "visible";
      let polling = false;
      const follow = async () => {
        if (!visible()) {
          if (inFlight) inFlight.abort();   // free the connection for the visible tabs
          return;
        }
        if (polling) return;
        polling = true;
        await pollWhile(visible);
        polling = false;
      };
      document.addEventListener("visibilitychange", follow);
      follow();
    }
  }
  start();
}

// Site storage can be blocked (a cross-site frame, strict privacy settings),
// and then every use of localStorage throws: what it would keep lasts for the visit.
const keptForTheVisit = new Map();

function recall(key) {
  try {
    return localStorage.getItem(key);
  } catch (err) {
    return keptForTheVisit.get(key) ?? null;
  }
}

function remember(key, value) {
  keptForTheVisit.set(key, value);
  try {
    localStorage.setItem(key, value);
  } catch (err) { /* blocked: kept for the visit only */ }
}

// Call show(item) for each item; one that throws is logged and skipped.
function each(items, show) {
  for (const item of items) {
    try {
      show(item);
    } catch (err) {
      console.error("longpoll: skipped item", item.id, err);
    }
  }
}

// An element with a class and, optionally, text. Text is always set as text.
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Only http(s) URLs may become links; anything else (javascript:, data:) stays text.
function isWebUrl(url) {
  return /^https?:\/\//i.test(url);
}

function clockTime(date) {
  return date.toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"});
}
