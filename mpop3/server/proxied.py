"""Connections from a load balancer: the PROXY protocol header on the
listeners marked for it (`listen_proxy`, `listen_tls_proxy`).

A connection there is taken only from a trusted proxy
(`proxy_trusted_networks`; none by default, so such a listener refuses
everyone until configured), and only with a well-formed header within
`proxy_timeout`. Anything else is closed without a greeting and logged,
rate-limited. Once the header is in, the session is the client's: its
address is the one logs, limits, failed-login delays and the cleartext
policy go by, and it counts as TLS if mpop3 does the TLS (listen_tls_proxy)
or the header says the client spoke TLS to the proxy. A LOCAL header (the
proxy's health check) is served with the real addresses, and never counts
as a client on this machine for `plaintext_auth loopback`.

The header is peeked at, then exactly its bytes are read: what follows is
the client's (its first command, or its TLS handshake) and stays in the
socket for the session.
"""

import asyncio
import logging
import socket
from dataclasses import dataclass

from .accept import limited
from .proxy_protocol import MAX_V2_HEADER, BadProxyHeader, ProxyHeaderReader, is_trusted

log = logging.getLogger("mpop3.server")

RECHECK = 0.01  # a header that came in part: look again this much later


@dataclass(frozen=True)
class Client:
    address: str  # the client's, from the header (the proxy's for LOCAL)
    tls: bool  # the client spoke TLS to the proxy
    local: bool  # a LOCAL header: the proxy itself, served with the real addresses


async def client_behind(loop, sock, proxy, settings):
    """The Client a trusted proxy's header names, or None (the connection
    is then to be closed: it was logged)."""
    if not is_trusted(proxy, settings.proxy_trusted_networks):
        limited.log(logging.WARNING, "proxy", "%s: not a trusted proxy (proxy_trusted_networks); closed", proxy)
        return None
    try:
        header = await asyncio.wait_for(read_header(loop, sock), max(0.1, settings.proxy_timeout))
    except BadProxyHeader as e:
        limited.log(logging.WARNING, "proxy", "%s: bad PROXY protocol header (%s); closed", proxy, e.reason)
        return None
    except TimeoutError:
        limited.log(logging.WARNING, "proxy", "%s: no PROXY protocol header in time; closed", proxy)
        return None
    except OSError:
        return None
    if header.local:
        log.debug("%s: PROXY LOCAL (a health check): served with the real addresses", proxy)
        return Client(proxy, False, True)
    return Client(header.source[0], header.tls, False)


async def read_header(loop, sock):
    """Peek until the bytes in the socket make a header (or prove there is
    none), then read exactly the header's bytes."""
    seen = -1
    while True:
        await readable(loop, sock)
        data = sock.recv(MAX_V2_HEADER, socket.MSG_PEEK)
        if not data:
            raise ConnectionError("closed before its PROXY header")
        header = ProxyHeaderReader().feed(data)
        if header is not None:
            taken = len(data) - len(header.rest)
            if sock.recv(taken) != data[:taken]:  # cannot be, short of another reader
                raise ConnectionError("the PROXY header changed under us")
            return header
        if len(data) == seen:  # still the same part: the socket stays readable
            await asyncio.sleep(RECHECK)
        seen = len(data)


def readable(loop, sock):
    fd = sock.fileno()
    ready = loop.create_future()

    def now_readable():
        loop.remove_reader(fd)
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, now_readable)
    ready.add_done_callback(lambda _: loop.remove_reader(fd))  # cancelled: the timeout
    return ready
