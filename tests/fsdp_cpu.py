"""``lite`` under torchrun with accelerate's FSDP path allowed on CPU processes (gloo), for tests only.

accelerate (1.15) turns FSDP on only when the processes run on accelerators (its MULTI_GPU, MULTI_XPU, ...
modes); on CPUs it silently keeps DDP, so ``lite train --fsdp`` refuses to run there. This launcher lifts
that one gate, and nothing else: FSDP2 itself (``fully_shard`` of every decoder block, DTensor shards,
gloo all-gathers and reduce-scatters), Trainer's FSDP checkpoints and lite's loss and final save then run
for real on the CPU.

    torchrun --standalone --nproc_per_node 2 tests/fsdp_cpu.py train ... --fsdp
"""

import sys

import accelerate.state
from accelerate.utils import DistributedType

_init = accelerate.state.AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # later AcceleratorState() calls copy the process state over their own: set it there too
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init_allowing_cpu_fsdp

if __name__ == "__main__":
    from lite.cli import main

    sys.exit(main(sys.argv[1:]))
