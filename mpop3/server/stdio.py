"""Stdin mode (`mpop3 -s`): one connection on file descriptors 0 and 1, as
inetd, xinetd and systemd's Accept=yes start it, or socat, or a person
trying it by hand. A socket there is served like any accepted connection
(implicit TLS if it is a listen_tls address); pipes and terminals get
transports of their own."""

import asyncio
import os
import socket
import stat


async def connect_stdin(service, connection):
    """Wire `connection` to descriptors 0 and 1, whatever they are."""
    if stat.S_ISSOCK(os.fstat(0).st_mode):  # inetd, systemd Accept=yes, socat
        await connect_socket(service, connection, socket.socket(fileno=os.dup(0)))
    elif stat.S_ISFIFO(os.fstat(0).st_mode) and stat.S_ISFIFO(os.fstat(1).st_mode):
        await connect_pipes(service.loop, connection)
    else:  # a terminal or a file: someone trying it by hand
        PlainFiles(service.loop, connection).start()


async def connect_socket(service, connection, sock):
    """A connected socket (stdin's, or one a listener accepted and forked us for)."""
    await service.connect_socket(connection, sock, service.tls_for(sock))


class PipeReader(asyncio.Protocol):
    """stdin in stdin mode: input for the connection. Its end is the client's
    end of input, never the end of the connection (replies may still be due)."""

    def __init__(self, connection, on_made):
        self.connection = connection
        self.on_made = on_made
        self.ended = False

    def connection_made(self, transport):
        self.on_made(transport)

    def data_received(self, data):
        self.connection.data_received(data)

    def eof_received(self):
        self.ended = True
        self.connection.eof_received()

    def connection_lost(self, exc):
        if not self.ended:
            self.ended = True
            self.connection.eof_received()


class PipeWriter(asyncio.Protocol):
    """stdout in stdin mode: when it is gone, so is the connection."""

    def __init__(self, connection):
        self.connection = connection

    def pause_writing(self):
        self.connection.pause_writing()

    def resume_writing(self):
        self.connection.resume_writing()

    def connection_lost(self, exc):
        self.connection.connection_lost(exc)


class PipeDuplex(asyncio.Transport):
    """stdin and stdout as one transport, for a connection."""

    def __init__(self, reader, writer):
        super().__init__()
        self.reader = reader
        self.writer = writer

    def write(self, data):
        self.writer.write(data)

    def writelines(self, lines):
        self.writer.writelines(lines)

    def pause_reading(self):
        self.reader.pause_reading()

    def resume_reading(self):
        self.reader.resume_reading()

    def set_write_buffer_limits(self, high=None, low=None):
        self.writer.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_size(self):
        return self.writer.get_write_buffer_size()

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self):
        return self.writer.is_closing()

    def close(self):
        self.reader.close()
        self.writer.close()

    def abort(self):
        self.reader.close()
        self.writer.abort()


class PlainFiles(asyncio.Transport):
    """stdin mode on a terminal or regular files, which the event loop cannot
    poll: a thread reads, writes block. Only for trying mpop3 by hand."""

    def __init__(self, loop, connection):
        super().__init__()
        self.loop = loop
        self.connection = connection
        self.closing = False

    def start(self):
        self.connection.connection_made(self)
        self.loop.create_task(self.read_all())

    async def read_all(self):
        while not self.closing:
            data = await self.loop.run_in_executor(None, os.read, 0, 65536)
            if self.closing:
                break
            if not data:
                self.connection.eof_received()
                break
            self.connection.data_received(data)

    def write(self, data):
        if not self.closing:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(1, view) :]
            except OSError:
                self.close()

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self):
        return self.closing

    def close(self):
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.connection.connection_lost, None)

    abort = close


async def connect_pipes(loop, connection):
    stdout = os.fdopen(os.dup(1), "wb", buffering=0)
    stdin = os.fdopen(os.dup(0), "rb", buffering=0)
    writer, _ = await loop.connect_write_pipe(lambda: PipeWriter(connection), stdout)

    def made(reader):
        duplex = PipeDuplex(reader, writer)
        # uvloop keeps only the descriptors: closing these file objects (as
        # the garbage collector would) would close them under it
        duplex.files = (stdin, stdout)
        connection.connection_made(duplex)

    await loop.connect_read_pipe(lambda: PipeReader(connection, made), stdin)
