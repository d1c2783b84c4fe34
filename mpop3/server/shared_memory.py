"""Memory a parent shares with its children: a memfd mapped shared, so that
forked children inherit it and an exec'd one can be passed its descriptor.
Where memfd_create is missing (not Linux), an anonymous shared mapping,
which only forks can share."""

import mmap
import os


def create(name, size, keep_fd=False):
    """(the mapping, its descriptor if `keep_fd` and it has one, else None)."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        return mmap.mmap(-1, size), None
    try:
        os.ftruncate(fd, size)
        memory = mmap.mmap(fd, size)
    except OSError:
        os.close(fd)
        raise
    if not keep_fd:
        os.close(fd)
        fd = None
    return memory, fd


def attach(fd):
    """The mapping of a descriptor a parent passed across an exec (closed here)."""
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


class Mapped:
    """What a process holds of a shared mapping: `memory`, its `cells` view
    and, in the parent until an exec'd child has it, its descriptor `fd`."""

    memory = cells = fd = None

    def close_fd(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self):
        self.close_fd()
        self.cells.release()
        self.memory.close()
