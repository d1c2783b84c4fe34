"""`make run`: serve a demo mailbox on 127.0.0.1:1110 (filled in by the protocol work)."""
import sys
print("make run: the POP3 server is not built yet", file=sys.stderr)
sys.exit(1)
