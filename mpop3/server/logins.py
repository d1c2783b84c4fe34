"""Login checks, in the order and at the pace the limits allow.

Every password check goes through LoginChecks, whatever the process model:

- attempts for one user from one address group (limits.address_group)
  take turns, so each sees the failures before it;
- each waits the throttle's delay for its (address, user) before anything
  is checked (limits.LoginThrottle.reserve): after a failure, a right
  password waits as long as a wrong one;
- at most `per_address` checks are in progress per address group; later
  ones wait their turn, in order (a user waiting out a delay holds no
  place, so other users from that address are not held up);
- then it waits for one of the process's `slots` for checks (one per CPU:
  hashing is CPU work, and more hashes at once than cores only makes each
  slower: 8 yescrypt hashes on 2 cores took 4 times as long each, and a
  real login waited behind them); at most `queue` attempts wait for a
  slot, beyond that one is refused at once (-ERR [SYS/TEMP]) instead of
  piling up behind junk;
- an attempt whose client has gone is withdrawn, and its password is never
  checked.
"""

import threading
from collections import deque

from ..errors import LoginsBusy
from .limits import address_group


class AttemptGate:
    """At most `limit` attempts in progress per address group; the others
    wait their turn, in order."""

    def __init__(self, limit):
        self.limit = limit
        self.running = {}  # group -> attempts in progress
        self.waiting = {}  # group -> deque of start callbacks

    def enter(self, group, start):
        """start() now if the group has room, or once it has. The attempt
        ends with leave(group) (or withdraw, if it never started)."""
        running = self.running.get(group, 0)
        if running < self.limit:
            self.running[group] = running + 1
            start()
        else:
            self.waiting.setdefault(group, deque()).append(start)

    def withdraw(self, group, start):
        """Take back an attempt still waiting; False if it has started."""
        queue = self.waiting.get(group)
        if not queue or start not in queue:
            return False
        queue.remove(start)
        if not queue:
            del self.waiting[group]
        return True

    def leave(self, group):
        queue = self.waiting.get(group)
        if queue:  # the slot passes to the next one in line
            start = queue.popleft()
            if not queue:
                del self.waiting[group]
            start()
            return
        running = self.running.get(group, 1) - 1
        if running > 0:
            self.running[group] = running
        else:
            self.running.pop(group, None)


class CheckSlots:
    """At most `count` credential checks at once in the process, and at most
    `queue` attempts waiting for one. A slot is taken on the loop and given
    back by the worker as soon as the credentials are checked (before the
    mailbox is opened: a lock wait must not hold up other logins)."""

    def __init__(self, loop, count, queue):
        self.loop = loop
        self.count = count
        self.queue = queue
        self.free = count
        self.lock = threading.Lock()  # release() comes from worker threads
        self.waiting = deque()  # start callbacks

    def enter(self, start):
        """start() now or once a slot is free; False if the queue is full."""
        with self.lock:
            if self.free > 0 and not self.waiting:
                self.free -= 1
                taken = True
            elif len(self.waiting) < self.queue:
                self.waiting.append(start)
                taken = False
            else:
                return False
        if taken:
            start()
        return True

    def withdraw(self, start):
        with self.lock:
            try:
                self.waiting.remove(start)
            except ValueError:
                pass

    def release(self):
        """A check is over (any thread)."""
        with self.lock:
            self.free += 1
            wake = bool(self.waiting)
        if wake:
            self.loop.call_soon_threadsafe(self.next)

    def next(self):
        while True:
            with self.lock:
                if self.free <= 0 or not self.waiting:
                    return
                self.free -= 1
                start = self.waiting.popleft()
            start()


class LoginChecks:
    def __init__(self, loop, workers, throttle, per_address, ipv6_prefix=64, slots=1, queue=64):
        self.loop = loop
        self.workers = workers
        self.throttle = throttle
        self.turns = AttemptGate(1)  # one attempt per (group, user) at a time
        self.gate = AttemptGate(per_address)  # checks in progress per group
        self.slots = CheckSlots(loop, slots, queue)
        self.ipv6_prefix = ipv6_prefix

    def group(self, peer):
        """The address group the limits count `peer` under."""
        return address_group(peer, self.ipv6_prefix)

    def submit(self, group, user, done, job, *args):
        """Check a login of `user` from address group `group`: job(*args,
        checked) in a worker when the limits allow, then done(result, exc)
        on the loop. The job calls checked() once the credentials are
        checked, right or wrong. Returns the Attempt, whose cancel()
        withdraws it if its client goes."""
        attempt = Attempt(self, group, user, done, job, args)
        self.turns.enter(attempt.key, attempt.reserve)
        return attempt


class Attempt:
    """One login attempt on its way: its turn for its (group, user), so
    that it sees every failure before it; the throttle's delay; a place
    among the group's checks in progress; a worker; then done()."""

    __slots__ = ("checks", "group", "key", "done", "job", "args", "state", "timer", "submitted", "slot")

    def __init__(self, checks, group, user, done, job, args):
        self.checks = checks
        self.group = group
        self.key = (group, checks.throttle.user_key(user))
        self.done = done
        self.job = job
        self.args = args
        self.state = "queued"  # then "waiting", "gated", "slotted", "running", "over"
        self.timer = None
        self.submitted = None  # the workers' job
        self.slot = False  # holds one of the process's check slots

    def reserve(self):
        wait = self.checks.throttle.reserve(*self.key)
        if wait > 0:
            self.state = "waiting"
            self.timer = self.checks.loop.call_later(wait, self.enter_gate)
        else:
            self.enter_gate()

    def enter_gate(self):
        self.state = "gated"
        self.timer = None
        self.checks.gate.enter(self.group, self.enter_slots)

    def enter_slots(self):
        self.state = "slotted"
        if not self.checks.slots.enter(self.run):
            self.finished(None, LoginsBusy())

    def run(self):
        self.state = "running"
        self.slot = True
        self.submitted = self.checks.workers.submit(self.finished, self.job, *self.args, self.checked)

    def checked(self):
        """From the job, once the credentials are checked (any thread)."""
        if self.slot:
            self.slot = False
            self.checks.slots.release()

    def finished(self, result, exc):
        if self.state == "over":
            return
        self.state = "over"
        self.checked()  # if the job failed before it could say so
        self.checks.gate.leave(self.group)
        self.checks.turns.leave(self.key)
        self.done(result, exc)

    def cancel(self):
        """The client has gone: withdraw the attempt if it is not being
        checked already (True); if it is, done() still comes, with what it
        got (False)."""
        checks, state = self.checks, self.state
        if state == "queued":
            checks.turns.withdraw(self.key, self.reserve)
        elif state == "waiting":
            self.timer.cancel()
            checks.turns.leave(self.key)
        elif state == "gated":
            checks.gate.withdraw(self.group, self.enter_slots)
            checks.turns.leave(self.key)
        elif state == "slotted":
            checks.slots.withdraw(self.run)
            checks.gate.leave(self.group)
            checks.turns.leave(self.key)
        elif state == "running" and self.submitted.cancel():
            self.checked()
            checks.gate.leave(self.group)
            checks.turns.leave(self.key)
        else:
            return False
        self.state = "over"
        return True
