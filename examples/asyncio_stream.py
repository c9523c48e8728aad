"""The same Stream on asyncio, without eventlet: the pattern outlives the library."""
import asyncio
import collections


class Stream:
    def __init__(self, history=100):
        self.items, self.last_id, self.event, self.waiting = collections.deque(maxlen=history), 0, asyncio.Event(), 0

    def publish(self, **fields):
        self.last_id += 1
        self.items.append({"id": self.last_id, **fields})
        event, self.event = self.event, asyncio.Event()     # as with eventlet: wake the current
        event.set()                                         # waiters; later ones wait for the next
        return self.items[-1]

    def since(self, cursor):
        if cursor is None or cursor > self.last_id:
            return list(self.items), self.last_id, False
        first = self.last_id - len(self.items) + 1
        return [i for i in self.items if i["id"] > cursor], self.last_id, cursor < first - 1

    async def wait(self, cursor, timeout=25):
        event = self.event          # taken before looking, as in longpoll.py
        items, last, gap = self.since(cursor)
        if not items and not gap and last == cursor:
            self.waiting += 1
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            finally:
                self.waiting -= 1
            items, last, gap = self.since(cursor)
        return items, last, gap
