"""Running POP3: the asyncio connections that carry out the protocol
core's decisions, what a process's sessions share, the process models and
the privilege rules. models.run() is where the `mpop3` command starts
serving; docs/architecture.md shows the whole."""
