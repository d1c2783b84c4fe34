"""Worker threads for blocking work (password hashing, opening and
committing mailboxes), lighter than run_in_executor: a job is a function,
its arguments and a callback that gets (result, exception) on the loop
thread. At thousands of logins a second the future-chaining machinery of
run_in_executor costs more than the job itself."""

import queue
import threading


class Workers:
    def __init__(self, loop, count):
        self.loop = loop
        self.count = count
        self.jobs = queue.SimpleQueue()
        self.threads = []  # started on demand: a one-session process needs one

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
                result, exc = function(*args), None
            except BaseException as e:  # handed to the callback, which decides
                result, exc = None, e
            try:
                self.loop.call_soon_threadsafe(callback, result, exc)
            except RuntimeError:  # the loop is gone (shutdown): nobody to tell
                pass

    def shutdown(self):
        """Finish every job already submitted, then stop (blocks)."""
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join()
