"""Start the default process group with a chosen backend, then run a module as ``__main__`` (used by check.py).

``python -m benchmarks.gpu.with_group cuda:gloo tests.distributed.trainer_step_program <args>`` under torchrun: every
rank binds to GPU 0 (two ranks share one GPU) and joins a group that has NO CPU backend, so a CPU tensor handed to
a collective fails with "No backend type associated with device type cpu", exactly as under NCCL. Accelerate then
finds the group already started and uses it.
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    backend, module, *rest = sys.argv[1:]
    import torch
    import torch.distributed as dist

    if backend.startswith("cuda"):
        os.environ["LOCAL_RANK"] = (
            "0"  # every rank on the one GPU (Accelerate reads LOCAL_RANK for its device)
        )
        torch.cuda.set_device(0)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    if dist.is_initialized():  # a group left alive is torn down during interpreter exit, which can abort it
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
