"""A canned POP3 responder on uvloop: the baseline the benchmarks divide by.

It does no work per request: every reply, message bodies included, is
prepared at start-up from an mbox file, and every command is answered
from memory (USER, PASS, STAT, QUIT with "+OK"). It is what "a uvloop
server doing nothing" costs on this machine, measured in the same run.

    python bench/canned.py PORT MBOX_FILE
"""

import asyncio
import os
import sys

import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpop3.mbox import kernels_reference as mbox_reference  # noqa: E402


def prepare(path):
    with open(path, "rb") as f:
        data = f.read()
    messages = mbox_reference.parse(data)
    bodies = [mbox_reference.render(mbox_reference.content(data, m)) for m in messages]
    listing = b"+OK\r\n" + b"".join(b"%d %d\r\n" % (i + 1, m.size) for i, m in enumerate(messages)) + b".\r\n"
    retr = [b"+OK\r\n" + body for body in bodies]
    return listing, retr


class Canned(asyncio.Protocol):
    listing = b""
    retr = []

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""
        transport.write(b"+OK canned\r\n")

    def data_received(self, data):
        self.buf += data
        out = []
        while b"\n" in self.buf:
            line, _, self.buf = self.buf.partition(b"\n")
            verb = line[:4].upper()
            if verb == b"LIST":
                out.append(self.listing)
            elif verb == b"RETR":
                out.append(self.retr[int(line[5:]) - 1])
            elif verb == b"QUIT":
                out.append(b"+OK\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(b"+OK 0 0\r\n")
        if out:
            self.transport.write(b"".join(out))


async def main(port, mbox):
    Canned.listing, Canned.retr = prepare(mbox)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Canned, "127.0.0.1", port, backlog=1024)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
