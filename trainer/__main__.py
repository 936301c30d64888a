import torch.distributed as dist

from .cli import main

main()
if dist.is_initialized():
    dist.destroy_process_group()  # gloo threads still running at interpreter exit can abort a rank after it saved
