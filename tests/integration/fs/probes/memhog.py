"""Allocate far past the memory limit in a child; report how the child ended."""

import json
import os

pid = os.fork()
if pid == 0:
    blocks = []
    while True:
        blocks.append(bytearray(16 << 20))  # zero-filled: every page is touched
_, status = os.waitpid(pid, 0)
print(json.dumps({"child_signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                  "child_exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}))
