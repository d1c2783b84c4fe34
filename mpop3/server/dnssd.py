"""DNS-SD advertisement of the listening ports through Avahi (`dnssd yes`).

Placeholder until the implementation lands: advertises nothing."""

import contextlib


@contextlib.contextmanager
def advertised(conf):
    """Advertise while the body runs (the server serves), withdraw after."""
    yield
