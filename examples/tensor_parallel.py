"""Tensor-parallel inference: the bundled questions answered by a model split over the processes of a launch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m examples.tensor_parallel [--model tiny_model]

The LLM follows Qwen2's tensor-parallel plan and the vision encoder its own (q/k/v and fc1 by columns,
out_proj and fc2 by rows); the projector stays whole on every rank. Rank 0 logs the answers.
"""

import argparse
import logging

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, DistributedConfig

from examples.demo import DEFAULT_MODEL, answer, bundled_examples

logger = logging.getLogger("tensor_parallel")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True,
                                                 distributed_config=DistributedConfig(tp_plan="auto")).eval()
    logging.basicConfig(level=logging.INFO if torch.distributed.get_rank() == 0 else logging.WARNING,
                        format="%(message)s")
    for example in bundled_examples():
        kind = "image" if "image" in example else "video"
        for question in example["questions"]:
            text, _, _ = answer(model, processor, kind, example[kind], question, max_new_tokens=16)
            logger.info("[%s] %s -> %s", kind, question, text)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
