"""Fork until refused (children sleep); report how many ran and how the last fork failed."""

import errno
import json
import os
import time

children = []
failure = None
for _ in range(10_000):
    try:
        pid = os.fork()
    except OSError as e:
        failure = errno.errorcode.get(e.errno)
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children.append(pid)
alive = sum(1 for pid in children if os.waitpid(pid, os.WNOHANG) == (0, 0))
print(json.dumps({"forked": len(children), "failure": failure, "alive": alive}), flush=True)
for pid in children:
    os.kill(pid, 9)
