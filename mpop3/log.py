"""Logging set-up: stderr or syslog, as the `log` directive says."""

import logging
import logging.handlers
import os

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(config, debug=False, force_stderr=False):
    root = logging.getLogger("mpop3")
    root.handlers.clear()
    root.propagate = False
    if config.log == "syslog" and not force_stderr:
        facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
        address = "/dev/log" if os.path.exists("/dev/log") else ("localhost", 514)
        handler = logging.handlers.SysLogHandler(address=address, facility=facility)
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
