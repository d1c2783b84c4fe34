"""Logging set-up: stderr or syslog, as the `log` directive says."""

import logging
import logging.handlers
import socket

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
