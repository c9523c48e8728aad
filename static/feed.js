// The feed page: entries join a queue as they arrive and leave it one at a
// time at a steady pace. The page never scrolls: the newest entry goes on top
// and whatever no longer fits below is dropped. Hovering pauses the stream.
"use strict";

const stream = document.getElementById("stream");
const entries = document.getElementById("entries");
const pace = document.getElementById("pace");
const waiting = document.getElementById("waiting");
const sources = document.getElementById("feeds");
const STEP_MS = Number(new URLSearchParams(location.search).get("pace")) || 1500;
const MAX_QUEUE = 1000;   // beyond this the oldest waiting entries are dropped
const queue = [];
let hovering = false;   // the pointer is over the stream
let pinned = false;     // paused with the button (for touch screens and keyboards)
const paused = () => hovering || pinned;

function relativeTime(iso) {
  if (!iso) return "";
  const minutes = Math.round((Date.now() - Date.parse(iso)) / 60000);
  if (minutes < 1) return "just now";
  if (minutes < 60) return `${minutes} min ago`;
  if (minutes < 48 * 60) return `${Math.round(minutes / 60)} h ago`;
  return new Date(iso).toLocaleDateString();
}

function render(e) {
  const item = el("li", "entry");
  const meta = el("div", "meta");
  meta.append(el("span", "source", e.feed));
  const time = el("time", "time", relativeTime(e.published));
  if (e.published) time.dateTime = e.published;
  meta.append(time);
  const title = el(isWebUrl(e.link) ? "a" : "span", "title", e.title || "Untitled");
  if (isWebUrl(e.link)) {
    title.href = e.link;
    title.target = "_blank";
    title.rel = "noopener noreferrer";
  }
  const heading = el("h2");   // the level below the page's <h1>: heading levels never skip one
  heading.append(title);
  item.append(meta, heading);
  if (e.summary) item.append(el("p", "summary", e.summary));
  return item;
}

function showCount() {
  waiting.textContent = `${queue.length} waiting`;
  pace.textContent = paused() ? "Paused" : "Live";
  pace.dataset.paused = String(paused());
}

// Drop the entries that no longer fit, so the page itself never grows.
function trim() {
  const bottom = stream.getBoundingClientRect().bottom;
  while (entries.children.length > 1 && entries.lastElementChild.getBoundingClientRect().top >= bottom) {
    entries.lastElementChild.remove();
  }
}

// Move one entry from the queue to the top of the stream.
function step() {
  if (paused() || !queue.length) return;
  each([queue.shift()], e => entries.prepend(render(e)));
  trim();
  showCount();
}
setInterval(step, STEP_MS);

entries.addEventListener("mouseenter", () => { hovering = true; showCount(); });
entries.addEventListener("mouseleave", () => { hovering = false; showCount(); });
pace.addEventListener("click", () => { pinned = !pinned; showCount(); });

longPoll("/feed/updates", "entries", (batch, gap, first) => {
  if (first) {
    // A new page shows the newest entries at once; only later ones are paced.
    each(batch.slice(-50), e => entries.prepend(render(e)));
    trim();
    return;
  }
  queue.push(...batch);
  if (queue.length > MAX_QUEUE) queue.splice(0, queue.length - MAX_QUEUE);
  showCount();
});

// How a feed's entries come: pushed by its WebSub hub, or polled (and why, on hover).
function delivery(push) {
  if (!push || push.state === "polled") return "polled";
  let hub = push.hub;
  try { hub = new URL(push.hub).host; } catch (err) { /* shown as it is */ }
  if (push.state === "subscribing") return `subscribing via ${hub}`;
  const last = push.last_push ? new Date(push.last_push * 1000).toISOString() : null;
  return `pushed via ${hub}` + (last ? ` · last push ${relativeTime(last)}` : "");
}

// Each feed's state, from /status, refreshed now and then.
async function refreshSources() {
  try {
    const res = await fetch("/status", {cache: "no-store", headers: {Accept: "application/json"}});
    const status = await res.json();
    sources.replaceChildren(...status.feeds.map(f => {
      const item = el("li", "source-state");
      item.dataset.ok = f.last_checked === null ? "pending" : String(f.ok);
      item.append(el("span", "dot"), el("span", "name", f.title || f.url));
      const detail = f.last_checked === null ? "waiting for the first check"
        : f.ok ? `${f.entries} entries` : f.error;
      item.append(el("span", "detail", detail), el("span", "via", delivery(f.push)));
      item.dataset.push = f.push ? f.push.state : "polled";
      item.title = f.push && f.push.why ? `${f.url}\n${f.push.why}` : f.url;
      return item;
    }));
    if (!status.feeds.length) sources.replaceChildren(el("li", "detail", "No feeds configured."));
  } catch (err) { /* the poll loop already shows that the server is away */ }
}
refreshSources();
setInterval(refreshSources, 10000);
