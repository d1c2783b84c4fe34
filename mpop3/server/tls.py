"""TLS through OpenSSL (Python's ssl module): one server context, built from
tls_cert/tls_key and the policy directives, rebuilt on SIGHUP.

The context is built once, before any fork (the parent of several server
processes builds it; a forked process inherits and uses it), and a session
switches to TLS with loop.start_tls() whether it came in on a listen_tls
listener (at once, before the greeting) or asked with STLS: one code path,
usable by a session served in a child process too.
"""

import functools
import ipaddress
import logging
import ssl

log = logging.getLogger("mpop3.server")

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
NO_PEER = "stdin"  # the client address of a session on pipes: local, and never TLS


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def context_from_config(conf):
    """The SSLContext the configuration asks for, or None without tls_cert.
    Raises TLSSetupError (one line, naming the directive and file)."""
    values = conf.values
    cert, key = values["tls_cert"], values["tls_key"]
    if cert is None:
        if key is not None:
            raise TLSSetupError("tls_key is set but tls_cert is not")
        for directive in ("listen_tls", "listen_tls_proxy"):
            if values[directive]:
                raise TLSSetupError(f"{directive} needs tls_cert (and tls_key)")
        return None
    return server_context(cert, key or cert, values["tls_min_version"], values["tls_ciphers"])


def server_context(cert, key, min_version="1.2", ciphers=None):
    """An SSLContext for serving, or TLSSetupError naming the bad file."""
    for path, directive in ((cert, "tls_cert"), (key, "tls_key")):
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise TLSSetupError(f"{directive} {path}: {e.strerror}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[min_version]
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    context.options |= ssl.OP_NO_RENEGOTIATION
    if ciphers:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise TLSSetupError(f"tls_ciphers {ciphers!r}: no cipher matches") from None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        raise TLSSetupError(
            f"tls_cert {cert} / tls_key {key}: not a usable certificate and key ({e.reason or e})"
        ) from None
    return context


def is_tls_address(listen_tls, sockname):
    """Whether a socket's local address (a listening socket's, or an accepted
    one's) is one of the listen_tls addresses: implicit TLS there."""
    if not isinstance(sockname, (tuple, list)) or len(sockname) < 2:
        return False  # a pipe or a UNIX socket
    host, port = sockname[0], sockname[1]
    return any(p == port and h in (host, "0.0.0.0", "::") for h, p in listen_tls)


def is_loopback(address):
    """Whether a peer address is 127.0.0.0/8 or ::1 (IPv4-mapped included)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # a UNIX socket or stdin peer reports no IP: not loopback
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@functools.lru_cache(maxsize=4096)  # once per client address, not per connection
def is_local(address):
    """Whether the client is on this machine: a loopback address, or no IP
    address at all (a pipe or a UNIX socket, as with `mpop3 -s`)."""
    try:
        ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    return is_loopback(address)


def describe(ssl_object):
    """`TLSv1.3 TLS_AES_256_GCM_SHA384` for the session's log line."""
    if ssl_object is None:
        return "?"
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0] if cipher else '?'}"


def reload(context, conf):
    """SIGHUP: the context to use from now on. The running one, holding the
    certificate and key of `conf` where they load: the listen_tls listeners
    hold it and forked processes inherit it, so new sessions get the new
    certificate, open ones keep theirs, and a bad file keeps the running one
    (logged)."""
    try:
        if context is None:  # no TLS so far: STLS from now on
            return context_from_config(conf)
        if conf.values["tls_cert"] is None:
            log.warning("reload: turning TLS off needs a restart")
        else:
            reload_into(context, conf)
    except TLSSetupError as e:
        log.error("reload: %s; keeping the running TLS certificate", e)
    return context


def reload_into(context, conf):
    """SIGHUP: re-read tls_* into the running context (listeners hold it, and
    each forked process its copy), after checking them on a fresh one, so a
    bad file changes nothing. New handshakes get the new certificate; open
    sessions keep theirs."""
    fresh = context_from_config(conf)
    values = conf.values
    context.minimum_version = fresh.minimum_version
    context.set_ciphers(":".join(cipher["name"] for cipher in fresh.get_ciphers()))
    try:
        context.load_cert_chain(values["tls_cert"], values["tls_key"] or values["tls_cert"])
    except (OSError, ssl.SSLError) as e:  # replaced since the check a moment ago
        raise TLSSetupError(f"tls_cert {values['tls_cert']}: {e}") from None
