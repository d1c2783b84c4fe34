"""A progress line for long work, so an administrator watching the log sees
that a long commit or a first Maildir scan is alive.

The work calls its Progress with (done, total) as it goes, once per window
or batch of messages, never per byte or per message: each call costs one
clock read. Work that ends within PROGRESS_AFTER seconds logs nothing;
longer work logs an info line at the first call after that and at the
first call PROGRESS_EVERY seconds after each line,

    mailbox alice: commit 412 of 1,024 MiB (40%) after 10 s
    mailbox alice: first scan 40,000 of 100,000 messages (40%) after 5.0 s

and, once done == total, a last line with the time it took:

    mailbox alice: commit done, 1,024 MiB in 23 s
"""

import time

PROGRESS_AFTER = 5.0  # seconds of work before the first line
PROGRESS_EVERY = 5.0  # seconds between lines after it

BYTES = "bytes"
MESSAGES = "messages"

KIB = 1 << 10
MIB = 1 << 20


class Progress:
    """Progress of one piece of work, `what` ("mailbox alice: commit"),
    counted in `unit` (BYTES or MESSAGES), logged on `logger`. `after` and
    `every` default to the module's constants as they are when the work
    starts; `clock` is for the tests."""

    __slots__ = ("logger", "what", "unit", "clock", "every", "started", "next", "logged", "ended")

    def __init__(self, logger, what, unit=BYTES, after=None, every=None, clock=time.monotonic):
        self.logger = logger
        self.what = what
        self.unit = unit
        self.clock = clock
        self.every = PROGRESS_EVERY if every is None else every
        self.started = clock()
        self.next = self.started + (PROGRESS_AFTER if after is None else after)
        self.logged = False
        self.ended = False

    def __call__(self, done, total):
        """`done` of `total` is done: log a line if it is time for one, or
        the last line when done reaches total (if any line went out)."""
        if done >= total:
            if self.logged and not self.ended:
                self.ended = True
                elapsed = self.clock() - self.started
                self.logger.info(
                    "%s done, %s %s in %s", self.what, *_amount(total, total, self.unit), _seconds(elapsed)
                )
            return
        now = self.clock()
        if now < self.next:
            return
        self.logged = True
        self.next = now + self.every
        self.logger.info(
            "%s %s of %s %s (%d%%) after %s",
            self.what,
            _amount(done, total, self.unit, down=True)[0],
            *_amount(total, total, self.unit),
            done * 100 // total,
            _seconds(now - self.started),
        )


def _amount(n, total, unit, down=False):
    """(`n`, the unit's name) in the unit that suits `total`: 40,000
    messages, 1,024 MiB, 3.5 MiB (a decimal below 100 units), 12 KiB;
    rounded down if `down` (a count in progress never reads as the total)."""
    if unit == MESSAGES:
        return f"{n:,}", "messages"
    scale, name = (MIB, "MiB") if total >= MIB else (KIB, "KiB")
    if total < 100 * scale:
        value = n * 10 // scale / 10 if down else n / scale
        return f"{value:,.1f}", name
    value = n // scale if down else round(n / scale)
    return f"{value:,}", name


def _seconds(s):
    return f"{s:.1f} s" if s < 10 else f"{s:,.0f} s"
