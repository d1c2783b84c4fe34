"""Where blocking work (checking a password, opening and committing a
mailbox) runs. A job is a function, its arguments and a callback that gets
(result, exception) on the loop thread, on a later turn of the loop.

Workers: threads, for a process serving many sessions. A thread and the
loop running Python at the same time fight over the interpreter lock: each
hand-off waits for the other to let go, and at 32 clients that fight cost
more CPU than the logins themselves (60% of the server's time in futex
waits and wake-ups, and 2,200 logins/s where running the jobs on the loop
gave 4,700). So the loop hands a job to an idle thread and waits for it,
briefly: a job that ends within HAND_OFF_WAIT (most: a plaintext password,
a small spool) costs two context switches and no fight; a longer one
(a crypt hash, a big spool, an MDA's lock) goes on alone while the loop
serves the others, and its callback comes when it ends. Kinds of job that
keep outlasting the wait are no longer waited for, so a site of slow
password hashes does not pay the wait on every login.

A job whose client has gone can be cancelled until a thread takes it
(how many password checks may wait, and run at once, is LoginChecks'
business: mpop3/server/logins.py).

InlineWorkers: the loop's own thread, for a process serving one session.
"""

import queue
import threading

# How long the loop waits for a job before letting it finish on its own.
HAND_OFF_WAIT = 0.002
# The share of a kind of job that must end within the wait for waiting to
# go on (a moving average); below it, every 16th job is still waited for
# so that a kind that became quick is noticed.
QUICK_ENOUGH = 0.5
RECENT = 0.1  # weight of the newest job in the moving average
PROBE_EVERY = 16


def run(function, args):
    """(result, None), or (None, the exception), which the callback judges."""
    try:
        return function(*args), None
    except BaseException as e:
        return None, e


class Job:
    __slots__ = ("callback", "function", "args", "reserved", "done", "lock", "outcome", "detached", "state")

    def __init__(self, callback, function, args, reserved):
        self.callback = callback
        self.function = function
        self.args = args
        self.reserved = reserved  # submit() counted a thread out of the idle ones for it
        self.done = threading.Lock()  # released by the worker when the outcome is in
        self.done.acquire()
        self.lock = threading.Lock()  # guards outcome and detached
        self.outcome = None
        self.detached = False  # the loop stopped waiting: the worker calls back
        self.state = "queued"  # then "running" (a thread took it) or "cancelled"

    def cancel(self):
        """Withdraw the job if no thread has taken it: True if withdrawn
        (it will not run, and nobody is called back)."""
        with self.lock:
            if self.state != "queued":
                return False
            self.state = "cancelled"
            return True


class Workers:
    def __init__(self, loop, count, wait=HAND_OFF_WAIT):
        self.loop = loop
        self.count = count
        self.wait = wait
        self.jobs = queue.SimpleQueue()
        self.threads = []  # started on demand
        self.idle = 0
        self.idle_lock = threading.Lock()
        self.quick = {}  # job function -> [moving share ended within the wait, jobs not waited for]

    def submit(self, callback, function, *args):
        """Run function(*args) in a thread; then callback(result, exc) on the
        loop. Returns the Job, to cancel."""
        with self.idle_lock:
            free = self.idle > 0
            if free:
                self.idle -= 1
        if not free and len(self.threads) < self.count:
            self.start_thread()
            free = True
        job = Job(callback, function, args, free)
        self.jobs.put(job)
        if free and self.worth_waiting(function):
            ended = job.done.acquire(timeout=self.wait)
            self.learn(function, ended)
        with job.lock:
            if job.outcome is None:
                job.detached = True
                return job
        self.loop.call_soon(callback, *job.outcome)
        return job

    def worth_waiting(self, function):
        stats = self.quick.get(function)
        if stats is None or stats[0] >= QUICK_ENOUGH:
            return True
        stats[1] += 1
        return stats[1] % PROBE_EVERY == 0

    def learn(self, function, ended):
        stats = self.quick.setdefault(function, [1.0, 0])
        stats[0] += RECENT * ((1.0 if ended else 0.0) - stats[0])

    def start_thread(self):
        thread = threading.Thread(target=self.work, name=f"mpop3-worker-{len(self.threads)}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if not job.reserved:  # queued while every thread was busy
                with self.idle_lock:
                    self.idle -= 1
            with job.lock:
                cancelled = job.state == "cancelled"
                job.state = "running"
            if cancelled:
                with self.idle_lock:
                    self.idle += 1
                continue
            outcome = run(job.function, job.args)
            with job.lock:
                job.outcome = outcome
                detached = job.detached
            with self.idle_lock:  # before the loop hears of it: its next job may be ours
                self.idle += 1
            job.done.release()
            if detached:
                try:
                    self.loop.call_soon_threadsafe(job.callback, *outcome)
                except RuntimeError:  # the loop is gone (shutdown): nobody to tell
                    pass

    def shutdown(self):
        """Finish every job already submitted, then stop (blocks)."""
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()


class InlineWorkers:
    """A process with one session has no other session to keep waiting
    while a job blocks, and starting a thread there would cost more than
    most jobs (a stack, a malloc arena, every later setuid() broadcast to
    it). The job runs at once; its callback still comes on a later turn of
    the loop, as with threads."""

    threads = ()

    def __init__(self, loop):
        self.loop = loop

    def submit(self, callback, function, *args):
        self.loop.call_soon(callback, *run(function, args))
        return DONE

    def shutdown(self):
        pass


class Done:
    """What InlineWorkers hands back: a job that has already run."""

    @staticmethod
    def cancel():
        return False


DONE = Done()
