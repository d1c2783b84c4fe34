# cython: language_level=3, boundscheck=False, wraparound=False
"""The spawner's loop (spawner.py) in C: wait for the master's requests and
fork a mail process for each, reap them and tell the master they ended.

Why not Python: after each fork every page of the spawner is shared with
its newest child, so every page the spawner then writes is copied, at a
fault, and the child keeps the old one for itself. A turn of the loop in
Python wrote about 200 pages (refcounts, the allocator, the selector, the
JSON of its answers): 0.6 ms of faults a login and 0.8 MB in each child.
This loop writes its stack and the buffers below.

The request is not read here, only carried into the child, which judges
it (spawner.py); the answers are written here: {"started": pid},
{"failed": reason}, {"ended": pid, "status": status}."""

from libc.errno cimport EINTR, errno
from libc.stdio cimport snprintf
from libc.string cimport memcpy, memset, strerror
from posix.signal cimport SIG_BLOCK, SIG_SETMASK, sigaddset, sigemptyset, sigprocmask, sigset_t
from posix.unistd cimport close, fork, read
from posix.wait cimport WNOHANG, waitpid


cdef extern from "<poll.h>":
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout) nogil
    enum:
        POLLIN
        POLLHUP
        POLLERR


cdef extern from "<sys/socket.h>":
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type
    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_LEN(size_t length)
    ssize_t recvmsg(int sockfd, msghdr *msg, int flags)
    ssize_t send(int sockfd, const void *buf, size_t len, int flags)
    enum:
        SOL_SOCKET
        SCM_RIGHTS
        MSG_TRUNC
        MSG_CTRUNC
        MSG_CMSG_CLOEXEC
        MSG_NOSIGNAL


cdef extern from "Python.h":
    void PyOS_BeforeFork()
    void PyOS_AfterFork_Parent()
    void PyOS_AfterFork_Child()


DEF LONGEST = 65537  # records.LONGEST + 1: a longer record is refused
DEF MOST_FDS = 16  # records.MOST_FDS
cdef char request[LONGEST]
cdef char control[512]
cdef char answer[256]
cdef int fds[MOST_FDS]
cdef int children = 0
cdef int fds_received = 0


def running():
    """How many of our children have not been reaped."""
    return children


def serve(int requests, int wake, bint taking, list handled, int sigchld):
    """Serve until there is something for Python to do:
    ("child", request bytes, [fds]) in a new child, which serves it;
    ("signals", bytes) in the spawner, the signals other than SIGCHLD;
    ("closed",) when the master closed its end (or cannot be told);
    ("idle",) when not `taking` and no child is left.
    `handled`: the signals held around a fork (the child's loop lets them in)."""
    global children
    cdef pollfd waits[2]
    cdef unsigned char signums[64]
    cdef ssize_t got, i
    cdef int count, pid, failure
    cdef bint other
    cdef sigset_t held, before
    sigemptyset(&held)
    for signum in handled:
        sigaddset(&held, signum)
    while True:
        if not taking and children == 0:
            return ("idle",)
        waits[0].fd = wake
        waits[0].events = POLLIN
        waits[1].fd = requests
        waits[1].events = POLLIN
        if poll(waits, 2 if taking else 1, -1) < 0:
            if errno == EINTR:
                continue
            raise OSError(errno, strerror(errno).decode())
        if waits[0].revents:
            got = read(wake, signums, sizeof(signums))
            other = False
            for i in range(got if got > 0 else 0):
                if signums[i] != sigchld:
                    other = True
            if not reap(requests):
                return ("closed",)
            if other:
                return ("signals", bytes(signums[:got]))
        if taking and waits[1].revents:
            count = receive(requests)
            if count < 0:
                return ("closed",)
            if count == 0:  # refused, and said so
                continue
            sigprocmask(SIG_BLOCK, &held, &before)
            PyOS_BeforeFork()
            pid = fork()
            failure = errno
            if pid == 0:
                PyOS_AfterFork_Child()
                children = 0
                return ("child", request[:count - 1], [fds[i] for i in range(fds_received)])
            PyOS_AfterFork_Parent()
            sigprocmask(SIG_SETMASK, &before, NULL)
            for i in range(fds_received):
                close(fds[i])
            if pid < 0:
                count = snprintf(answer, sizeof(answer), b'{"failed":"%s"}', strerror(failure))
            else:
                children += 1
                count = snprintf(answer, sizeof(answer), b'{"started":%d}', pid)
            if not tell(requests, count):
                return ("closed",)



cdef int receive(int sock):
    """One request into `request` and `fds`: its length + 1, 0 if it was
    refused (and the master told), -1 at the end."""
    global fds_received
    cdef iovec part
    cdef msghdr message
    cdef cmsghdr *header
    cdef ssize_t got
    cdef int n, i
    part.iov_base = request
    part.iov_len = LONGEST
    memset(&message, 0, sizeof(message))
    message.msg_iov = &part
    message.msg_iovlen = 1
    message.msg_control = control
    message.msg_controllen = sizeof(control)
    fds_received = 0
    got = recvmsg(sock, &message, MSG_CMSG_CLOEXEC)
    if got < 0:
        return 0 if errno == EINTR else -1
    header = CMSG_FIRSTHDR(&message)
    while header != NULL:
        if header.cmsg_level == SOL_SOCKET and header.cmsg_type == SCM_RIGHTS:
            n = <int>((header.cmsg_len - CMSG_LEN(0)) // sizeof(int))
            for i in range(n):
                if fds_received < MOST_FDS:
                    memcpy(&fds[fds_received], CMSG_DATA(header) + i * sizeof(int), sizeof(int))
                    fds_received += 1
        header = CMSG_NXTHDR(&message, header)
    if got == 0 and fds_received == 0:
        return -1
    if got >= LONGEST or message.msg_flags & (MSG_TRUNC | MSG_CTRUNC):
        for i in range(fds_received):
            close(fds[i])
        fds_received = 0
        n = snprintf(answer, sizeof(answer), b'{"failed":"request too long"}')
        return 0 if tell(sock, n) else -1
    return <int>got + 1


cdef bint reap(int sock):
    """Tell the master of every child that has ended; False if it cannot be told."""
    global children
    cdef int status, pid, n
    while children > 0:
        pid = waitpid(-1, &status, WNOHANG)
        if pid <= 0:
            return True
        children -= 1
        n = snprintf(answer, sizeof(answer), b'{"ended":%d,"status":%d}', pid, status)
        if not tell(sock, n):
            return False
    return True


cdef bint tell(int sock, int length):
    while send(sock, answer, length, MSG_NOSIGNAL) < 0:
        if errno != EINTR:
            return False
    return True
