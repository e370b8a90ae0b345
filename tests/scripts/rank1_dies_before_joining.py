"""Rank 1 exits before it joins the process group; rank 0 waits for it in the rendezvous."""

import os
import sys

if os.environ.get("RANK") == "1":
    sys.exit(3)
import torch.distributed as dist  # noqa: E402

dist.init_process_group("gloo")
dist.barrier()
