"""Dovecot's POP3 server on the benchmark's spools, for comparison.

Used by bench/test_load.py when Dovecot is installed (Debian:
dovecot-pop3d); it runs in the foreground from a configuration of its own
under the benchmark directory, with the same users, passwords and mbox
spools. Either in its "high-performance" login mode (service_count = 0)
with its mail processes reused from one session to the next (every user
has the same uid here), or as it comes (`per_session`): a login process
and a mail process for every session, like mpop3's process per session.
"""

import os
import pwd
import shutil
import subprocess

CONF = """\
base_dir = {root}/dovecot-run-{port}
state_dir = {root}/dovecot-state-{port}
log_path = {root}/dovecot-{port}.log
instance_name = mpop3-bench-{port}
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
default_internal_user = dovecot
default_login_user = dovenull
default_process_limit = 3000
default_client_limit = 6000
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/dovecot-passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/dovecot-home/%u
}}
mail_location = mbox:{root}/dovecot-home/%u:INBOX={spool}/%u:INDEX=MEMORY
mbox_write_locks = fcntl
protocol pop3 {{
  mail_max_userip_connections = 3000
}}
service pop3-login {{
  inet_listener pop3 {{
    port = {port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
  service_count = {reuse}
  process_min_avail = {spare_logins}
}}
service pop3 {{
  process_limit = 3000
  service_count = {reuse}
  process_min_avail = {spare_mail}
}}
"""
HIGH_PERFORMANCE = dict(reuse=0, spare_logins=2, spare_mail=8)
AS_IT_COMES = dict(reuse=1, spare_logins=0, spare_mail=0)  # Dovecot's defaults


def available():
    return shutil.which("dovecot") is not None and os.geteuid() == 0


def start(root, spool, port, users, per_session=False):
    """Start Dovecot; returns the Popen (the master process)."""
    nobody = pwd.getpwnam("nobody")
    with open(os.path.join(root, "dovecot-passwd"), "w") as f:
        for user in users:
            f.write(f"{user}:{{PLAIN}}pw::::::\n")
    os.makedirs(os.path.join(root, "dovecot-home"), exist_ok=True)
    for path in [os.path.join(root, "dovecot-home"), spool] + [os.path.join(spool, n) for n in os.listdir(spool)]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    os.chmod(root, 0o711)
    conf = os.path.join(root, f"dovecot-{port}.conf")
    with open(conf, "w") as f:
        f.write(
            CONF.format(
                root=root,
                spool=spool,
                port=port,
                uid=nobody.pw_uid,
                gid=nobody.pw_gid,
                **(AS_IT_COMES if per_session else HIGH_PERFORMANCE),
            )
        )
    return subprocess.Popen(["dovecot", "-F", "-c", conf], stderr=subprocess.PIPE)
