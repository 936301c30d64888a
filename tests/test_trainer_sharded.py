"""Distributed training against one process at the same global batch, on 2 CPU processes (gloo):
DDP, FSDP2 as transformers applies it at load time (`--fsdp_size`), and accelerate's FSDP2 plugin
of `fsdp.yaml` with the distributed type accelerate sets only on GPUs set by a test harness. The
plain `fsdp.yaml` launch and ZeRO-3 need 2 CUDA devices and skip here with the reason."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from tests.tiny_processor import tiny_processor
from tests.tiny_training import REPLIES, tiny_model, weights, write_jsonl
from tools.local import REPO_ROOT, remote_module
from tools.tiny import tiny_config, tiny_tokenizer
from trainer import Videollama3SFTConfig, Videollama3Trainer
from trainer.cli import main

FSDP_ON_CPU = (
    "accelerate sets DistributedType.FSDP only inside `elif self.distributed_type in [MULTI_GPU, MULTI_MLU, "
    "MULTI_SDAA, MULTI_MUSA, MULTI_NPU, MULTI_XPU, MULTI_HPU, MULTI_NEURON]` (accelerate/state.py, "
    "AcceleratorState.__init__, L947-974 in 1.16); CPU ranks are MULTI_CPU (state.py L755-770), so "
    "`accelerate launch --config_file trainer/configs/fsdp.yaml ... --use_cpu` trains as plain DDP "
    "(without --use_cpu each process trains alone); needs 2 CUDA devices. On CPU ranks the plugin runs in "
    "test_accelerate_fsdp2_plugin_of_fsdp_yaml_on_cpu_ranks_matches_one_process, and transformers' FSDP2 "
    "(`--fsdp_size`) in test_fsdp2_at_load_time_on_two_cpu_processes_matches_one_process"
)
ZERO3_ON_CPU = (
    "accelerate sets up DeepSpeed only `and not cpu` (accelerate/state.py L935 in 1.16), and deepspeed is "
    "not in this machine's package index; needs 2 CUDA devices and `pip install deepspeed`"
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


# The CPU tests train both sets. Stage 3 with stage 1's freezing: the vision encoder trains (its gradients
# must be reduced on the text-only rank too) and the LLM must come out bit-identical. Stage 3 as shipped
# trains all three: only then does a wrong reduction of the LLM's gradients change losses and weights.
FROZEN_LLM = ("vision_encoder", "mm_projector")
ALL_MODULES = ("vision_encoder", "mm_projector", "llm")


def flags(base, data, media, out, per_device, trainable=FROZEN_LLM):
    return ["--stage", "3", "--model", base, "--data", data, "--data_root", str(media), "--output_dir", out,
            "--trainable_modules", *trainable, "--max_steps", str(STEPS),
            "--per_device_train_batch_size", str(per_device), "--bf16", "false", "--report_to", "none",
            "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--max_frames", "4",
            "--max_visual_tokens", "256", "--max_length", "2048", "--seed", "0"]


def losses(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return [entry["loss"] for entry in json.load(handle)["log_history"] if "loss" in entry]


class OneProcess:
    """The base checkpoint, rows and media of every run here, and the one-process runs at the global batch
    (2 rows per step), each trained once per set of trainable modules and shared by the sharded runs."""

    def __init__(self, base, data, media_root, tmp_path_factory):
        self.base, self.data, self.media_root = base, data, media_root
        self.tmp_path_factory, self.outputs = tmp_path_factory, {}

    def flags(self, out, per_device, trainable):
        return flags(self.base, self.data, self.media_root, out, per_device=per_device, trainable=trainable)

    def output(self, trainable):
        if trainable not in self.outputs:
            out = str(self.tmp_path_factory.mktemp("single"))
            main(self.flags(out, per_device=2, trainable=trainable))
            self.outputs[trainable] = out
        return self.outputs[trainable]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, base_checkpoint, media_root):
    data = write_jsonl(tmp_path_factory.mktemp("sharded-data") / "train.jsonl", rows())
    return OneProcess(base_checkpoint, data, media_root, tmp_path_factory)


def check_sharded_run_matches_one_process(tmp_path, one_process, launcher, extra=(), trainable=FROZEN_LLM,
                                          module="trainer"):
    """Two processes started by `launcher` give the losses of one process at the same global batch,
    a complete checkpoint, the weights of the one process, and the LLM bit-identical when frozen (changed
    when it trains). Returns the launch's log."""
    single = one_process.output(trainable)
    sharded = str(tmp_path / "sharded")
    command = [sys.executable, "-m", *launcher, "-m", module,
               *one_process.flags(sharded, per_device=1, trainable=trainable), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "the accelerate config asks for" not in log, log[-4000:]  # it really sharded
    assert log.count("training on 2 process(es)") == 1, log[-4000:]  # the main process logs, once
    assert log.count("effective settings: ") == 1, log[-4000:]

    sharded_losses = losses(sharded)
    assert len(sharded_losses) == STEPS
    torch.testing.assert_close(sharded_losses, losses(single), atol=1e-4, rtol=0)
    model, info = AutoModelForCausalLM.from_pretrained(sharded, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sorted(os.listdir(sharded)) == sorted(os.listdir(single))  # the same files: no wrapper's code or state
    with open(os.path.join(sharded, "config.json")) as handle:
        assert json.load(handle)["auto_map"]["AutoModelForCausalLM"] == "modeling_videollama3.Videollama3Qwen2ForCausalLM"
    before, after = weights(one_process.base), weights(sharded)
    assert set(after) - set(before) <= {"lm_head.weight"} and set(before) <= set(after)
    if "lm_head.weight" in after:  # transformers' FSDP2 save gathers tied weights as separate tensors
        assert torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])
    llm = [k for k in before if not k.startswith(("model.vision_encoder.", "model.mm_projector."))]
    assert llm and all(torch.equal(before[k], after[k]) for k in llm) == ("llm" not in trainable)  # frozen: bit-identical
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.vision_encoder."))
    for name, weight in weights(single).items():
        torch.testing.assert_close(after[name], weight, atol=1e-6, rtol=0)
    return log


def assert_holds_about_half(log, sharding):
    """The main process's log line "<sharding>: this process holds X of Y parameter values" shows it holds
    half of the model, plus FSDP2's padding of uneven dimensions."""
    held = re.search(re.escape(sharding) + r": this process holds (\d+) of (\d+) parameter values", log)
    assert held, log[-4000:]
    local, total = map(int, held.groups())
    assert total / 2 <= local < total * 0.55


def accelerate_launch(tmp_path, accelerate_config, **fsdp_config):
    config = yaml.safe_load((REPO_ROOT / "trainer" / "configs" / accelerate_config).read_text())
    config.update(num_processes=2, mixed_precision="no", main_process_port=29500 + os.getpid() % 1000)
    config.get("fsdp_config", {}).update(fsdp_config)
    (tmp_path / "launch.yaml").write_text(yaml.safe_dump(config))
    return ["accelerate.commands.launch", "--config_file", str(tmp_path / "launch.yaml")]


@pytest.mark.parametrize("trainable", [FROZEN_LLM, ALL_MODULES], ids=["llm_frozen", "all_modules"])
def test_ddp_on_two_cpu_processes_matches_one_process(tmp_path, one_process, trainable):
    """2 gloo CPU ranks, one of them text-only each step."""
    check_sharded_run_matches_one_process(tmp_path, one_process, accelerate_launch(tmp_path, "ddp_cpu.yaml"),
                                          extra=["--use_cpu"], trainable=trainable)


@pytest.mark.parametrize("trainable", [FROZEN_LLM, ALL_MODULES], ids=["llm_frozen", "all_modules"])
def test_fsdp2_at_load_time_on_two_cpu_processes_matches_one_process(tmp_path, one_process, trainable):
    """transformers' FSDP2 at load time, launched as the README's FSDP2 command launches it
    (`torch.distributed.run --standalone --nproc_per_node 2 -m trainer ... --use_cpu --fsdp_size 2`) with
    this module's flags: each rank holds about half the weights, the text-only rank runs the sharded
    vision layers too (the dummy pass), and the checkpoint is the one process's layout."""
    launcher = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    log = check_sharded_run_matches_one_process(tmp_path, one_process, launcher,
                                                extra=["--use_cpu", "--fsdp_size", "2"], trainable=trainable)
    assert_holds_about_half(log, "sharded at load time over 2 processes")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason=FSDP_ON_CPU)
def test_accelerate_fsdp2_stage3_matches_one_process(tmp_path, one_process):
    check_sharded_run_matches_one_process(tmp_path, one_process, accelerate_launch(tmp_path, "fsdp.yaml"))


@pytest.mark.parametrize("trainable", [FROZEN_LLM, ALL_MODULES], ids=["llm_frozen", "all_modules"])
def test_accelerate_fsdp2_plugin_of_fsdp_yaml_on_cpu_ranks_matches_one_process(tmp_path, one_process, trainable):
    """`fsdp.yaml` (its wrap classes, full-state-dict save) through accelerate's own FSDP2 code, on CPU
    ranks by way of `tests.accelerate_fsdp_on_cpu`, which sets the distributed type a GPU launch gets."""
    launcher = accelerate_launch(tmp_path, "fsdp.yaml", fsdp_cpu_ram_efficient_loading=False)  # refused on CPU
    log = check_sharded_run_matches_one_process(tmp_path, one_process, launcher, extra=["--use_cpu"],
                                                trainable=trainable, module="tests.accelerate_fsdp_on_cpu")
    assert_holds_about_half(log, "accelerate FSDP2")


@pytest.mark.skipif(torch.cuda.device_count() < 2 or importlib.util.find_spec("deepspeed") is None,
                    reason=ZERO3_ON_CPU)
def test_zero3_stage3_matches_one_process(tmp_path, one_process):
    check_sharded_run_matches_one_process(tmp_path, one_process, accelerate_launch(tmp_path, "zero3.yaml"))


def test_fsdp_size_refuses_what_load_time_fsdp2_cannot_do(tmp_path, monkeypatch):
    """Each refusal names the setting and the way out, before any weights load."""
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"fsdp_size=2 must be at least 2 and equal the number of processes the launch "
                                         r"started \(WORLD_SIZE=1\)"):
        Videollama3SFTConfig(output_dir=out, fsdp_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"fsdp_size=1 must be at least 2"):
        Videollama3SFTConfig(output_dir=out, fsdp_size=1)
    with pytest.raises(ValueError, match="LoRA under load-time FSDP2 is not supported"):
        Videollama3SFTConfig(output_dir=out, fsdp_size=2, lora=True, save_strategy="no")
    with pytest.raises(ValueError, match=r"and --fsdp \(accelerate's FSDP plugin\) both shard the model"):
        Videollama3SFTConfig(output_dir=out, fsdp_size=2, fsdp="full_shard", save_strategy="no")
    with pytest.raises(ValueError, match="add --save_only_model"):
        Videollama3SFTConfig(output_dir=out, fsdp_size=2)
    with pytest.raises(ValueError, match=r"the launch started 2 processes, but they train as 1; CPU ranks form one "
                                         r"gloo job only with --use_cpu"):
        Videollama3SFTConfig(output_dir=out, fsdp_size=2, save_only_model=True)


def test_fsdp_plan_has_one_unit_per_vision_encoder_and_decoder_layer():
    """Every rule of the plan `DistributedConfig(fsdp_size=N)` applies names modules of the model
    (transformers skips, with a warning, rules that match nothing)."""
    model = remote_module("modeling_videollama3").Videollama3Qwen2ForCausalLM(tiny_config(tiny_tokenizer()))
    modules = {re.sub(r"\.\d+$", ".*", name) for name, _ in model.named_modules()}
    assert set(model.fsdp_plan) <= modules
    assert model.fsdp_plan["model.vision_encoder.encoder.layers.*"] == model.fsdp_plan["model.layers.*"] == "free_full_weight"


def test_fsdp_size_with_a_model_loaded_unsharded_is_refused(tmp_path, monkeypatch):
    """fsdp_size acts when the trainer loads the model; a model object loaded without it would train unsharded."""
    monkeypatch.setattr(Videollama3SFTConfig, "check_fsdp_size", lambda self: None)  # a 2-process launch's config
    args = Videollama3SFTConfig(output_dir=str(tmp_path / "out"), fsdp_size=2, save_strategy="no", report_to="none")
    processor = tiny_processor()
    with pytest.raises(ValueError, match=r"fsdp_size=2 shards the model as it loads: pass its path as model=, or "
                                         r"load it with distributed_config=DistributedConfig\(fsdp_size=2\)"):
        Videollama3Trainer(model=tiny_model(processor), args=args, processing_class=processor)
