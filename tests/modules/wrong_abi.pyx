# Claims a module ABI this mpop3 does not speak.
MPOP3_MODULE_CLASS = "auth"
MPOP3_ABI_VERSION = 99
