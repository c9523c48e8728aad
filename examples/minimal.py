"""The long-polling chat in one screen: python examples/minimal.py [PORT]   (PORT 0: any free one)"""
import warnings; warnings.filterwarnings("ignore", r"\s*Eventlet is deprecated")  # noqa: E702
import eventlet
eventlet.monkey_patch()     # before bottle: its request must be per green thread, not per OS thread
import collections, json, sys, time, bottle, eventlet.wsgi  # noqa: E401,E402

class Stream:
    def __init__(self, history=100):
        self.items, self.last_id, self.event = collections.deque(maxlen=history), 0, eventlet.Event()

    def publish(self, **fields):
        self.last_id += 1
        self.items.append({"id": self.last_id, **fields})
        event, self.event = self.event, eventlet.Event()    # an Event is sent once: swap in a new one,
        event.send()                                        # then wake everyone waiting on the old
        return self.items[-1]

    def since(self, cursor):    # (items after cursor, the cursor to send next, whether some were dropped)
        if cursor is None or cursor > self.last_id:
            return list(self.items), self.last_id, False
        first = self.last_id - len(self.items) + 1
        return [i for i in self.items if i["id"] > cursor], self.last_id, cursor < first - 1

    def wait(self, cursor, timeout=25):
        event = self.event          # taken before looking: a publish after the look still wakes us
        items, last, gap = self.since(cursor)
        if not items and not gap and last == cursor:
            event.wait(timeout)     # the timeout bounds what a browser that left costs
            items, last, gap = self.since(cursor)
        return items, last, gap

chat, app = Stream(), bottle.Bottle()
app.default_error_handler = lambda e: json.dumps({"error": e.body})

@app.get("/chat/updates")
def updates():
    text = bottle.request.query.get("cursor")
    if text is not None and not text.isdecimal():
        raise bottle.HTTPError(400, "cursor must be a non-negative integer")
    items, cursor, gap = chat.wait(None if text is None else int(text))
    return {"messages": items, "cursor": cursor, **({"gap": True} if gap else {})}

@app.post("/chat/messages")
def post():
    data = bottle.request.json
    body = data.get("body") if isinstance(data, dict) else None
    if not isinstance(body, str) or not body.strip():
        raise bottle.HTTPError(400, "body must be a non-empty string")
    bottle.response.status = 201
    return chat.publish(nick=str(data.get("nick") or "anonymous"), body=body.strip(), time=time.time())

@app.get("/")
def page():
    return bottle.static_file("minimal.html", root=sys.path[0])

if __name__ == "__main__":
    sock = eventlet.listen(("127.0.0.1", int(sys.argv[1]) if sys.argv[1:] else 8000))
    print(f"serving on http://127.0.0.1:{sock.getsockname()[1]}/", flush=True)
    eventlet.wsgi.server(sock, app, log_output=False)
