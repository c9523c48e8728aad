"""The Event a stream's parked polls wait on, sent a slice of waiters at a time.

Stream.add() sends one Wakeup per publish; this is how its waiters are woken
without the hub going deaf to its sockets during a fan-out. pause() is what
the front door does between two requests of a connection, and pace() what a
poll that has news does before it is answered. It uses eventlet and metrics (the
fan-out's duration), nothing of the app."""

import collections
import contextvars
import time

import eventlet
import eventlet.hubs

import metrics

# Entries of the queue done in one turn of eventlet's hub, before the hub reads
# its sockets again (Wakeup.wake_slice()): parked polls to wake, and the woken
# ones' returns to reading (pause()). Measured in bench.py --busy: see docs/performance.md.
WAKE_SLICE = 50

# Answers a second that all the polls share (pace()): about 0.7 of a core where
# an answer costs 200 us, as on the benchmark's box. Measured in bench.py --busy
# --answer-rate: see docs/performance.md.
ANSWER_RATE = 3500.0

woken = contextvars.ContextVar("woken", default=False)     # in a green thread a publish woke, till pause()
holding = {}    # the green threads pace() holds now -> the timer that ends the hold


class Wakeup:
    """What a stream's parked polls wait on until the next publish: like eventlet's
    Event (sent once, ready ever after), except that the waiters it wakes join
    one queue, shared by every stream, that the hub works through WAKE_SLICE
    entries per turn.

    Why: Event.send() makes every waiter due in the same pass of the hub's timers,
    and the hub reads no socket until that pass is over. With clients re-polling
    at once, as in a busy room, waves follow each other, and a POST, or a new
    visitor's first request, waited out a whole fan-out. Between slices the hub
    reads what came in: 3,000 clients re-polling, 5 posts a second, 2 cores:
    POST p99 27 ms against 0.67 s, delivery p99 0.98 s against 1.28 s, every
    message delivered (bench.py --busy; docs/performance.md, also for loaded
    boxes, and slices of 200: far less gain). One queue, oldest first,
    not a slice of each wave per turn: waves sliced side by side each got a
    slice per turn however many polls they held, and the big ones starved (47 %
    delivered in time at 3,000 clients, delivery p99 7 s)."""

    # What the hub is to do, oldest first, WAKE_SLICE a turn: (call, its argument).
    queue = collections.deque()
    draining = False                # a turn of the hub will take the next slice

    def __init__(self):
        self.sent, self.parked = False, set()

    def ready(self):
        return self.sent

    def wait(self, timeout):
        """Park the calling green thread until send(), or for timeout seconds."""
        if self.sent:
            return
        me, hub = eventlet.getcurrent(), eventlet.hubs.get_hub()
        self.parked.add(me)
        timer = hub.schedule_call_local(timeout, self.wake, me)
        try:
            hub.switch()
        finally:
            timer.cancel()
            self.parked.discard(me)
        woken.set(self.sent)

    def wake(self, waiter):
        if waiter in self.parked:       # else it is gone already: timed out, or its client left
            waiter.switch()

    def send(self):
        """Wake every waiter, from the hub's next turn on: whoever published is answered first."""
        self.sent_at = time.perf_counter()
        eventlet.hubs.get_hub().schedule_call_global(0, self.wake_all)

    def wake_all(self):
        self.sent = True
        if self.parked:
            Wakeup.queue.extend((self.wake, waiter) for waiter in self.parked)
            Wakeup.queue.append((self.waved, None))
            Wakeup.drain()

    def waved(self, _):
        metrics.wave(time.perf_counter() - self.sent_at)

    @staticmethod
    def drain():
        if not Wakeup.draining:
            Wakeup.draining = True
            eventlet.hubs.get_hub().schedule_call_global(0, Wakeup.wake_slice)

    @staticmethod
    def wake_slice():
        # In a timer, so in the hub's own greenlet: a woken poll that blocks
        # (on its next read) switches back here, and the next one is woken.
        # The rest waits for the hub's next turn, after its sockets.
        queue = Wakeup.queue
        if not queue:
            Wakeup.draining = False
            return
        # The next turn is booked first: should a green thread die of an error
        # as it is switched to (the hub reports it), the rest of the queue is not lost.
        eventlet.hubs.get_hub().schedule_call_global(0, Wakeup.wake_slice)
        for _ in range(min(WAKE_SLICE, len(queue))):
            call, argument = queue.popleft()
            call(argument)


def pause():
    """Yield to the hub, before reading a connection's next request.

    A green thread that a publish woke goes to the back of the queue: a fan-out
    writes all its answers before any of its polls goes back to reading, as
    when a wave was woken in one turn. Back to reading in the next turn, that
    work, a quarter of an answer's, had come before the wave's last answers: at
    10,000 parked, fan-out p99 1.50 s against 1.13 s now, the CPU the same
    (bench.py, in turns). Any other, a poster's, is not held behind a wave;
    but a request that comes on a woken poll's own keep-alive connection (a
    browser may send a POST on it) is read after the wave, as before slices."""
    if not woken.get():
        return eventlet.sleep(0)
    woken.set(False)
    rejoin(eventlet.getcurrent())
    eventlet.hubs.get_hub().switch()


def rejoin(green):
    """Put a green thread that has switched to the hub at the back of the queue: resumed in its turn."""
    Wakeup.queue.append((resume, green))
    Wakeup.drain()


def resume(paused):
    if not paused.dead:
        paused.switch()


def pace(connection, polls, deadline):
    """Hold a poll that has news, until its connection's last answer is polls /
    ANSWER_RATE seconds old (till the poll's deadline at most): the seconds held.
    connection.answered_at is when that was; the caller sets it.

    Why: a busy room's answers carry little. Every client re-polls the moment
    it is answered, and an answer costs about the same with one message or
    five. Unheld, the server answered as often as its core let it, 3 messages
    an answer, and the core was never free. Held, each connection gets its
    share of ANSWER_RATE, and what comes meanwhile joins its next answer:
    3,000 clients re-polling, 5 posts a second, 2 cores: 59-63 against 72 us
    of CPU a message (Tornado: 104), delivery p99 0.85-0.95 against 0.78-0.84 s,
    POST p99 15-16 against 16-17 ms (two sittings of bench.py --busy;
    docs/performance.md). A quiet room does not notice: 20 polls are held 6 ms
    at most, and only news that follows news that closely. A held poll wakes
    through the queue, a slice a turn: the polls one wave answered fall due
    together, and woken straight from their timers they kept a POST waiting
    (p99 150 ms)."""
    now = time.monotonic()
    held = min(connection.answered_at + polls / ANSWER_RATE, deadline) - now
    if held <= 0:
        return 0
    me, hub = eventlet.getcurrent(), eventlet.hubs.get_hub()
    holding[me] = hub.schedule_call_global(held, due, me)
    try:
        hub.switch()
    finally:
        timer = holding.pop(me, None)       # still there if an error ended the hold
        if timer is not None:
            timer.cancel()
    return held


def due(held):
    # Out of holding as it joins the queue: release() must not queue it twice.
    if holding.pop(held, None) is not None:
        rejoin(held)


def release():
    """End every hold now (at shutdown, when every poll is answered at once)."""
    for held, timer in list(holding.items()):
        timer.cancel()
        due(held)
