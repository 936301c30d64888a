"""Tensor-parallel inference: the bundled questions answered by a model split over the processes of a launch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/tensor_parallel.py [--model tiny_model]

The LLM follows Qwen2's tensor-parallel plan and the vision encoder its own (q/k/v and fc1 by columns,
out_proj and fc2 by rows); the projector stays whole on every rank. Rank 0 prints the answers.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoProcessor, DistributedConfig

MEDIA = Path(__file__).resolve().parent / "media"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "tiny_model"))
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True,
                                                 distributed_config=DistributedConfig(tp_plan="auto")).eval()
    for example in json.loads((MEDIA / "examples.json").read_text()):
        kind = "image" if "image" in example else "video"
        for question in example["questions"]:
            messages = [{"role": "user", "content": [{"type": kind, kind: str(MEDIA / example[kind])},
                                                     {"type": "text", "text": question}]}]
            inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
            answer = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
            if torch.distributed.get_rank() == 0:
                print(f"[{kind}] {question} -> {answer}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
