"""Tensor-parallel inference on 2 CPU processes (gloo) equals one process: image, video, text only."""

import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from tools.oracle import image, our_inputs, video
from tools.tiny import tiny_config, tiny_tokenizer
from tools.local import REPO_ROOT, remote_module

M = remote_module("modeling_videollama3")
WORKER = REPO_ROOT / "tests" / "tensor_parallel_worker.py"


def test_two_cpu_ranks_match_one_process(tmp_path):
    tok = tiny_tokenizer()
    config = tiny_config(tok, tie_word_embeddings=False)
    # every head count divides by the 2 ranks: text 4 heads / 2 KV heads, vision 2 heads
    assert config.num_attention_heads % 2 == config.num_key_value_heads % 2 == 0
    assert config.vision_encoder_config.num_attention_heads % 2 == 0
    torch.manual_seed(0)
    M.Videollama3Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model")
    img = config.image_token_index
    torch.manual_seed(1)
    cases = {
        "image": our_inputs(tok, [([image(4, 6)], "What is shown?")], img),
        "video": our_inputs(tok, [([video(4, 4, 4, keep_fraction=0.5)], "What happens?")], img),
        "text only": our_inputs(tok, [([], "Hello there")], img),
    }
    torch.save(cases, tmp_path / "inputs.pt")

    # One process first: it also fills the remote-code module cache the ranks then read.
    single = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True).eval()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(tmp_path / "model"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode == 0, run.stderr[-4000:]
    sharded = torch.load(tmp_path / "out.pt")

    vision = config.vision_encoder_config
    assert sharded["shapes"] == {  # each rank holds half of every split weight
        "llm q_proj": (config.hidden_size // 2, config.hidden_size),
        "vision q_proj": (vision.hidden_size // 2, vision.hidden_size),
        "vision fc2": (vision.hidden_size, vision.intermediate_size // 2),
        "projector readout.0": (config.hidden_size, vision.hidden_size),  # replicated
        "lm_head": (config.vocab_size // 2, config.hidden_size),
    }
    with torch.no_grad():
        for name, inputs in cases.items():
            assert (sharded[name] - single(**inputs).logits).abs().max() <= 1e-6, name  # measured: about 2e-7
            greedy = single.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            assert torch.equal(sharded[name + " greedy"], greedy), name
