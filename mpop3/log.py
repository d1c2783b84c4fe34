"""Logging set-up: stderr or syslog, as the `log` directive says."""

import logging
import logging.handlers
import socket
import time

from .errors import ConfigError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(config, debug=False, force_stderr=False):
    root = logging.getLogger("mpop3")
    root.handlers.clear()
    root.propagate = False
    if config.log == "syslog" and not force_stderr:
        facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
        try:
            # SysLogHandler ignores an unreachable socket; we want to know at start-up
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                probe.connect(config.syslog_socket)
            handler = logging.handlers.SysLogHandler(address=config.syslog_socket, facility=facility)
        except OSError as e:
            raise ConfigError(
                config.path, f"log syslog: cannot reach syslog at {config.syslog_socket}: {e.strerror or e}"
            ) from None
        handler.setFormatter(logging.Formatter("mpop3[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("mpop3[%(process)d]: %(levelname)s: %(message)s"))
    root.addHandler(handler)
    level = LEVELS[config.log_level]
    if force_stderr:  # --check-config: only what needs the administrator's eye
        level = max(level, logging.WARNING)
    root.setLevel(logging.DEBUG if debug else level)
    return root


def reload_level(running, new):
    """SIGHUP: a changed log_level applies at once; an unchanged one leaves
    the level as it is (so -d's debug stays)."""
    if new.values["log_level"] != running.values["log_level"]:
        logging.getLogger("mpop3").setLevel(LEVELS[new.values["log_level"]])


class RateLimited:
    """Log lines that clients can cause, at most one per `interval` seconds
    per kind, so a flood cannot fill the disk or drown the other lines; the
    next line that goes out says how many were left out meanwhile."""

    def __init__(self, logger, interval=10.0, clock=time.monotonic):
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.kinds = {}  # kind -> [when the last line went out, lines left out since]

    def log(self, level, kind, message, *args):
        now = self.clock()
        entry = self.kinds.get(kind)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return
        left_out = entry[1] if entry is not None else 0
        self.kinds[kind] = [now, 0]
        if left_out:
            message += " (%d more like it in the last %g s not logged)"
            args = (*args, left_out, self.interval)
        self.logger.log(level, message, *args)

    def warning(self, kind, message, *args):
        self.log(logging.WARNING, kind, message, *args)

    def error(self, kind, message, *args):
        self.log(logging.ERROR, kind, message, *args)
