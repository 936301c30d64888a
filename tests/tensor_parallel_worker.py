"""One rank of `tests/test_tensor_parallel.py`: load a saved folder with tensor parallelism, run its inputs.

Run as `python -m torch.distributed.run --nproc_per_node 2 tests/tensor_parallel_worker.py FOLDER INPUTS OUT`.
Rank 0 writes every input's logits and greedy tokens, and the local shapes of a few sharded weights.
"""

import sys

import torch
from transformers import AutoModelForCausalLM, DistributedConfig

SHARDED = {
    "llm q_proj": "model.layers.0.self_attn.q_proj.weight",
    "vision q_proj": "model.vision_encoder.encoder.layers.0.self_attn.q_proj.weight",
    "vision fc2": "model.vision_encoder.encoder.layers.0.mlp.fc2.weight",
    "projector readout.0": "model.mm_projector.readout.0.weight",
    "lm_head": "lm_head.weight",
}


def main(folder: str, inputs_path: str, out_path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, distributed_config=DistributedConfig(tp_plan="auto")
    ).eval()
    results = {"shapes": {}}
    parameters = dict(model.named_parameters())
    for label, name in SHARDED.items():
        weight = parameters[name]
        results["shapes"][label] = tuple((weight.to_local() if hasattr(weight, "to_local") else weight).shape)
    with torch.no_grad():
        for name, inputs in torch.load(inputs_path).items():
            results[name] = model(**inputs).logits
            results[name + " greedy"] = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    if torch.distributed.get_rank() == 0:
        torch.save(results, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
