"""Where mpop3 finds its files: the build tree, or what `make install` wrote.

`make install` writes mpop3/_layout.py next to this file with the installed
locations; without it we are running from the build tree.
"""

import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TREE = os.path.dirname(_PACKAGE_DIR)

try:
    from ._layout import CONFIG_FILE, MODULE_DIR, MODULE_MK
except ImportError:  # the build tree
    CONFIG_FILE = os.path.join(_TREE, "mpop3.conf")
    MODULE_DIR = os.path.join(_TREE, "modules")
    MODULE_MK = os.path.join(_TREE, "modules", "module.mk")
