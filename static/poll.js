// The long-poll loop both pages share, and two small DOM helpers.
"use strict";

// Ask `url` for what is newer than our cursor, hand it to onBatch, and ask
// again at once, forever. The server holds each request open until it has
// news (or its poll timeout passes), so an empty answer is normal, not an error.
function longPoll(url, onBatch) {
  let cursor = null;
  let failures = 0;
  const state = document.getElementById("state");
  const setState = (name, text) => { state.dataset.state = name; state.textContent = text; };

  async function loop() {
    for (;;) {
      try {
        const query = cursor === null ? "" : "?cursor=" + cursor;
        const res = await fetch(url + query, {cache: "no-store", headers: {Accept: "application/json"}});
        if (!res.ok) {
          const error = new Error("HTTP " + res.status);
          error.retryAfter = Number(res.headers.get("Retry-After")) || 0;
          throw error;
        }
        const batch = await res.json();
        failures = 0;
        setState("live", "Live");
        onBatch(batch);
        // Resume from the server's cursor, so nothing is missed or shown twice;
        // after a server restart it is lower than ours, and that is right too.
        cursor = batch.cursor;
      } catch (err) {
        failures += 1;
        // Exponential backoff with jitter and a cap: a restarted server is not
        // stampeded by every browser at the same instant.
        const ceiling = Math.min(30000, 500 * 2 ** Math.min(failures, 6));
        // A server that said when to come back (429, 503) is not asked sooner.
        const delay = Math.max(ceiling / 2 + Math.random() * ceiling / 2, 1000 * (err.retryAfter || 0));
        setState("reconnecting", "Reconnecting…");
        await new Promise(resolve => setTimeout(resolve, delay));
      }
    }
  }
  loop();
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
