"""POP3 itself, without I/O: the command table, parsing, every reply, SASL,
and the protocol core that holds a session's state and decisions.
docs/architecture.md shows where this sits."""
