// The chat page: show each message as it arrives, and post new ones.
"use strict";

const messages = document.getElementById("messages");
const nick = document.getElementById("nick");
const body = document.getElementById("body");
const form = document.getElementById("compose");
const notice = document.getElementById("notice");
const KEEP = 500;   // messages kept on the page

nick.value = recall("longpoll.nick") || "";
nick.addEventListener("input", () => remember("longpoll.nick", nick.value.trim()));

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

function show(m) {
  const item = el("li", "message");
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
  messages.append(item);
}

longPoll("/chat/updates", "messages", (batch, gap) => {
  const atBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
  if (gap) messages.append(el("li", "gap", "Some messages were missed while you were away."));
  each(batch, show);
  while (messages.children.length > KEEP) messages.firstElementChild.remove();
  if (atBottom || batch.some(m => m.nick === nick.value.trim())) {
    messages.scrollTop = messages.scrollHeight;
  }
});

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
