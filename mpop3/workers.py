"""Where blocking work (password hashing, opening and committing mailboxes)
runs. A job is a function, its arguments and a callback that gets (result,
exception) on the loop thread, on a later turn of the loop.

Workers: threads, for a process serving many sessions; lighter than
run_in_executor (at thousands of logins a second the future-chaining
machinery of run_in_executor costs more than the job itself).
InlineWorkers: the loop's own thread, for a process serving one session.
"""

import queue
import threading


def run(function, args):
    """(result, None), or (None, the exception), which the callback judges."""
    try:
        return function(*args), None
    except BaseException as e:
        return None, e


class Workers:
    def __init__(self, loop, count):
        self.loop = loop
        self.count = count
        self.jobs = queue.SimpleQueue()
        self.threads = []  # started on demand

    def submit(self, callback, function, *args):
        """Run function(*args) in a thread; then callback(result, exc) on the loop."""
        self.jobs.put((callback, function, args))
        if len(self.threads) < self.count and self.jobs.qsize() > 0:
            thread = threading.Thread(target=self.work, name=f"mpop3-worker-{len(self.threads)}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def work(self):
        while True:
            job = self.jobs.get()
            if job is None:
                return
            callback, function, args = job
            try:
                self.loop.call_soon_threadsafe(callback, *run(function, args))
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

    def shutdown(self):
        pass
