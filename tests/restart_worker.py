"""torchrun worker for the restart tests: rank 1 dies in the first KILLS attempts, after the group formed.

A restarted rank 1 starts 2 s late, so that rank 0 always looks up its address first: in a store shared
across attempts it would find the dead rank's. Every attempt prints "attempt A rank R formed" once its process group works (an all-reduce of ones equals the
world size); the last attempt exits 0.
"""

import os
import signal
import time

import torch
import torch.distributed as dist

from recsys.train.distributed import init_distributed

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
if attempt > 0 and os.environ["RANK"] == "1":
    time.sleep(2)  # a restarted rank that comes up late: rank 0 reaches the store's keys first
env = init_distributed(timeout_s=30)
x = torch.ones(4)
dist.all_reduce(x)
assert x.tolist() == [env.world_size] * 4
print(f"attempt {attempt} rank {env.rank} formed", flush=True)
if attempt < int(os.environ["KILLS"]):
    if env.rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # rank 0 keeps working until the agent stops it
        dist.all_reduce(x)
        time.sleep(0.05)
dist.destroy_process_group()
