"""`python -m trainer` under accelerate's FSDP plugin on CPU ranks, for tests only.

accelerate builds the plugin from the launch's FSDP settings but sets `DistributedType.FSDP` only on
GPU-type devices (accelerate/state.py, `AcceleratorState.__init__`). This sets the state a GPU launch
gets, so that accelerate's own FSDP2 wrapping, gradient reduction and full-state-dict saving of
`trainer/configs/fsdp.yaml` run over gloo. Run as `accelerate launch ... -m tests.accelerate_fsdp_on_cpu ARGS`.
"""

import logging

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import TrainerCallback
from trl import SFTTrainer

from trainer.cli import main
from trainer.trainers import Videollama3Trainer, held_parameters

logger = logging.getLogger("trainer")


class HeldParameters(TrainerCallback):
    """Logs, once accelerate has wrapped the model, how much of it the main process holds."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            logger.info("accelerate FSDP2: this process holds %d of %d parameter values", *held_parameters(model))


def create_accelerator_and_postprocess(self):
    SFTTrainer.create_accelerator_and_postprocess(self)
    state = self.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(f"expected CPU ranks, got {state.distributed_type}")
    # AcceleratorState copies PartialState's fields whenever it is built again, so both carry the type.
    PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    self.is_fsdp_enabled = True


ORIGINAL_INIT = Videollama3Trainer.__init__


def trainer_init(self, *args, **kwargs):
    ORIGINAL_INIT(self, *args, **kwargs)
    self.add_callback(HeldParameters())


if __name__ == "__main__":
    Videollama3Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess
    Videollama3Trainer.__init__ = trainer_init
    main()
    # Gloo's threads still running at interpreter exit can abort a rank ("terminate called without an
    # active exception") after the run has saved.
    torch.distributed.destroy_process_group()
