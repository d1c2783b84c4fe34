"""mpop3: a modular POP3 server (auth and storage are modules loaded at run time)."""

__version__ = "0.1.0"

# The module ABI this server speaks. A module records the version it was
# built for (mpop3/include/mpop3_module.pxi); the loader refuses any other.
# Bump it whenever a table entry changes its signature or meaning.
ABI_VERSION = 1
