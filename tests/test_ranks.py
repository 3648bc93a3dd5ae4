"""The torchrun process group (ranks.py): left, it is destroyed for good, threads and all, even
after torch has bound it as a default argument (torch.distributed.nn.functional, which a process's
first optimizer imports). A group that outlived `destroy_process_group` kept gloo's threads until
exit, where a rank of tests/test_distributed.py died of SIGABRT."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

LEAVE = textwrap.dedent(
    """
    import os, torch
    from gemmascope import ranks

    ranks.join("gloo")
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # torch imports torch.distributed.nn here
    ranks.leave()
    ranks.leave()  # a second leave (the atexit one after a failure) does nothing
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    print(" ".join(sorted(names)))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_leaving_destroys_the_group_and_its_threads() -> None:
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    # -W error: `leave` warns when the group outlives destroy_process_group
    command = [sys.executable, "-W", "error::RuntimeWarning", "-c", LEAVE]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = done.stdout.split()
    assert threads and not [name for name in threads if "gloo" in name], threads
