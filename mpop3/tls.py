"""TLS through OpenSSL (Python's ssl module): one server context, built from
tls_cert/tls_key and the policy directives, rebuilt on SIGHUP."""

import ipaddress
import ssl

MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TLSSetupError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def server_context(cert, key, min_version="1.2", ciphers=None):
    """An SSLContext for serving, or TLSSetupError naming the bad file."""
    for path, what in ((cert, "certificate"), (key, "key")):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise TLSSetupError(f"{what} {path}: {e.strerror}") from None
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
        raise TLSSetupError(f"certificate {cert} / key {key}: {e.reason or e}") from None
    return context


def is_loopback(address):
    """Whether a peer address is 127.0.0.0/8 or ::1 (IPv4-mapped included)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False  # a UNIX socket or stdin peer reports no IP: not loopback
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def describe(ssl_object):
    """`TLSv1.3 TLS_AES_256_GCM_SHA384` for the session's log line."""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0] if cipher else '?'}"
