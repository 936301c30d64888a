"""Distributed training against one process at the same global batch: DDP on 2 CPU processes
(gloo), and stage 3 under FSDP2 and ZeRO-3, which accelerate sets up only on GPU-type devices, so
on CPU they skip with the reason."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.test_trainer import REPLIES, media_root, save_base, tiny_model, write_jsonl  # noqa: F401
from tests.tiny_processor import tiny_processor
from tools.local import REPO_ROOT
from trainer.cli import main

# Found on accelerate 1.16 / torch 2.13 CPU: torch's `fully_shard` itself trains on 2 gloo CPU
# processes (frozen parameters included), but accelerate never sets up FSDP there.
FSDP_ON_CPU = (
    "accelerate sets DistributedType.FSDP only inside `elif self.distributed_type in [MULTI_GPU, MULTI_MLU, "
    "MULTI_SDAA, MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU, MULTI_NEURON]` (accelerate/state.py, "
    "AcceleratorState.__init__, L947-974 in 1.16); CPU ranks are MULTI_CPU (state.py L755-770), so "
    "`accelerate launch --config_file trainer/configs/fsdp.yaml ... --use_cpu` trains as plain DDP "
    "(without --use_cpu each process trains alone); needs 2 CUDA devices"
)
ZERO3_ON_CPU = (
    "accelerate sets up DeepSpeed only `and not cpu` (accelerate/state.py L935 in 1.16), and deepspeed is "
    "not installed here; needs 2 CUDA devices and `pip install deepspeed`"
)
STEPS = 2


def rows():
    """One text-only row and one image + video row: with one row per process, every step has a
    rank without media next to a rank with them (the dummy vision pass keeps FSDP from hanging)."""
    return [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": REPLIES[2]}]},
        {"image": ["grey.png"], "video": ["clip.mp4"], "conversations": [
            {"from": "human", "value": "<image>\n<video>\nCompare them."}, {"from": "gpt", "value": REPLIES[3]}]},
    ]


def flags(base, data, media, out, per_device):
    # Stage 3 with stage 1's freezing: the vision encoder trains (its gradients must be reduced on
    # the text-only rank too) and the LLM must come out bit-identical.
    return ["--stage", "3", "--model", base, "--data", data, "--data_root", str(media), "--output_dir", out,
            "--trainable_modules", "vision_encoder", "mm_projector", "--max_steps", str(STEPS),
            "--per_device_train_batch_size", str(per_device), "--bf16", "false", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--max_frames", "4",
            "--max_visual_tokens", "256", "--max_length", "2048", "--seed", "0"]


def losses(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]


def check_sharded_run_matches_one_process(tmp_path, media_root, accelerate_config, extra=()):  # noqa: F811
    """Two processes under `trainer/configs/<accelerate_config>` give the losses of one process at
    the same global batch, a complete checkpoint, and a bit-identical frozen LLM."""
    processor = tiny_processor()
    base = save_base(tiny_model(processor), processor, tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", rows())
    single = str(tmp_path / "single")
    main([*flags(base, data, media_root, single, per_device=2), *extra])

    config = yaml.safe_load((REPO_ROOT / "trainer" / "configs" / accelerate_config).read_text())
    config.update(num_processes=2, mixed_precision="no", main_process_port=29500 + os.getpid() % 1000)
    (tmp_path / "launch.yaml").write_text(yaml.safe_dump(config))
    sharded = str(tmp_path / "sharded")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "launch.yaml"),
               "-m", "trainer", *flags(base, data, media_root, sharded, per_device=1), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "the accelerate config asks for" not in log, log[-4000:]  # it really sharded
    assert log.count("training on 2 process(es)") == 1, log[-4000:]  # the main process logs, once
    assert log.count("effective settings: ") == 1, log[-4000:]

    assert len(losses(sharded)) == STEPS
    torch.testing.assert_close(losses(sharded), losses(single), atol=1e-4, rtol=0)
    model, info = AutoModelForCausalLM.from_pretrained(sharded, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    before, after = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(sharded, "model.safetensors"))
    llm = [k for k in before if not k.startswith(("model.vision_encoder.", "model.mm_projector."))]
    assert llm and all(torch.equal(before[k], after[k]) for k in llm)  # frozen: bit-identical
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.vision_encoder."))


def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, media_root):  # noqa: F811
    """The same contract where it can run here: 2 gloo CPU ranks, one of them text-only each step."""
    check_sharded_run_matches_one_process(tmp_path, media_root, "ddp_cpu.yaml", extra=["--use_cpu"])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=FSDP_ON_CPU)
def test_fsdp2_stage3_matches_one_process(tmp_path, media_root):  # noqa: F811
    check_sharded_run_matches_one_process(tmp_path, media_root, "fsdp.yaml")


@pytest.mark.skipif(torch.cuda.device_count() < 2 or importlib.util.find_spec("deepspeed") is None,
                    reason=ZERO3_ON_CPU)
def test_zero3_stage3_matches_one_process(tmp_path, media_root):  # noqa: F811
    check_sharded_run_matches_one_process(tmp_path, media_root, "zero3.yaml")
