"""The CLI: four stages chained on a tiny model, YAML recipes, the README's commands, --help, resume.

The 2-process gloo DDP run is in test_trainer_sharded.py."""

import json
import logging
import os
import re
import shlex
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoProcessor

from tests.tiny_processor import tiny_processor
from tests.tiny_training import changed, official_rows, save_base, tiny_model, weights, write_jsonl
from tools.local import REPO_ROOT
from trainer.cli import main
from trainer.checkpoint import REMOTE_CODE_FILES

TINY_FLAGS = [
    "--use_cpu", "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    "--per_device_train_batch_size", "2", "--max_frames", "4", "--max_visual_tokens", "256", "--max_length", "2048",
    "--logging_steps", "1",
]


def test_four_stages_chain_from_the_cli(tmp_path, base_checkpoint, data_path, media_root):
    previous = base_checkpoint
    for stage in (1, 2, 3, 4):
        out = str(tmp_path / f"stage{stage}")
        flags = ["--model", previous, "--data", data_path, "--data_root", str(media_root), "--output_dir", out,
                 "--max_steps", "1", *TINY_FLAGS]
        if stage == 3:  # the same settings through a YAML recipe
            recipe = tmp_path / "stage3.yaml"
            recipe.write_text(yaml.safe_dump({"stage": 3, "model": previous, "data": data_path,
                                              "data_root": str(media_root), "output_dir": out, "max_steps": 1}))
            main(["--config", str(recipe), *TINY_FLAGS])
        else:
            main(["--stage", str(stage), *flags])
        for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json", *REMOTE_CODE_FILES):
            assert os.path.exists(os.path.join(out, name)), f"stage {stage} output lacks {name}"
        before, after = weights(previous), weights(out)
        assert changed(before, after, "model.mm_projector.")
        assert changed(before, after, "model.layers.") == (stage != 1)  # stage 1 keeps the LLM frozen
        previous = out

    model, info = AutoModelForCausalLM.from_pretrained(previous, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoProcessor.from_pretrained(previous, trust_remote_code=True)
    batch = processor.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True, return_dict=True,
                                          add_generation_prompt=True, return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[1] == batch["input_ids"].shape[1] + 2


def test_cli_resume_and_missing_arguments(tmp_path, base_checkpoint, data_path, media_root, caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    with pytest.raises(SystemExit, match="--data is required"):
        main(["--stage", "2", "--model", base_checkpoint, "--output_dir", str(tmp_path)])
    out = str(tmp_path / "run")
    flags = ["--stage", "2", "--model", base_checkpoint, "--data", data_path, "--data_root", str(media_root),
             "--output_dir", out, *TINY_FLAGS]
    first = main([*flags, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"])
    assert first.state.global_step == 2 and os.path.isdir(os.path.join(out, "checkpoint-2"))
    caplog.clear()
    resumed = main([*flags, "--max_steps", "3", "--resume"])
    assert resumed.state.global_step == 3
    messages = [r.getMessage() for r in caplog.records]
    assert f"resuming from {os.path.join(out, 'checkpoint-2')} at step 2" in messages
    assert messages[-1] == f"saved to {out}"
    assert sum(m.startswith("effective settings: ") for m in messages) == 1


def test_model_init_kwargs_reach_from_pretrained(tmp_path, base_checkpoint, data_path, media_root, caplog):
    """TRL's `--model_init_kwargs` JSON is how CLI users pick the attention (flash_attention_2 on GPUs);
    SFTTrainer's warning that they are ignored (it only sees the loaded model) is not shown."""
    caplog.set_level(logging.WARNING)
    trainer = main(["--stage", "3", "--model", base_checkpoint, "--data", data_path, "--data_root", str(media_root),
                    "--output_dir", str(tmp_path / "eager"), "--max_steps", "1", *TINY_FLAGS,
                    "--model_init_kwargs", '{"attn_implementation": "eager", "trust_remote_code": false}'])
    model = trainer.model
    assert model.config._attn_implementation == "eager"
    assert model.model.vision_encoder.config._attn_implementation == "eager"
    assert trainer.state.global_step == 1
    assert not [r for r in caplog.records if "model_init_kwargs" in r.getMessage()]


def readme_training_commands():
    """The `python -m trainer ...` lines of the README's Training section, as written."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Training"):]
    section = section[:section.index("\n## ", 1)]
    return [line.split("#")[0].strip() for line in section.splitlines() if line.startswith("python -m trainer")]


def test_readme_stage_command_runs_verbatim_on_cpu(tmp_path, monkeypatch, media_root):
    """The README's stage-1 line, with the full preset (bf16 on only where the device has it), in a
    folder holding what the line names; the output folder gets our model card."""
    line = next(c for c in readme_training_commands() if c.startswith("python -m trainer --stage 1 "))
    argv = shlex.split(line)[3:]
    settings = dict(zip(argv[::2], argv[1::2]))
    monkeypatch.chdir(tmp_path)
    processor = tiny_processor()
    save_base(tiny_model(processor), processor, tmp_path / settings["--model"])
    write_jsonl(tmp_path / settings["--data"], official_rows())
    shutil.copytree(media_root, tmp_path / settings["--data_root"])
    trainer = main(argv)
    assert not trainer.args.bf16 or torch.cuda.is_available()
    out = tmp_path / settings["--output_dir"]
    assert (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "# VideoLLaMA3, stage 1 (vision encoder adaptation)" in card
    assert f"- base model: `{settings['--model']}`" in card and f"`{settings['--data']}` (4 rows)" in card
    assert "| `projector_learning_rate` | `0.001` |" in card
    assert "None" not in card.split("## Usage")[0].replace("`None`", "")  # no TRL placeholders
    assert "AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)" in card


def test_help_with_a_stage_shows_its_values_in_one_usage_block(capsys):
    for stage, lr in ((1, "0.001"), (2, "1e-05")):
        with pytest.raises(SystemExit) as exited:
            main(["--stage", str(stage), "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert text.count("usage:") == 1
        assert re.search(r"--learning_rate LEARNING_RATE.*\n.*\(default: " + re.escape(lr) + r"\)", text)
        assert re.search(r"--stage STAGE\s+Stage number 1-4 of the official recipe\. \(default: " + str(stage), text)
        assert "--model MODEL" in text and "--data DATA" in text


def test_bundled_example_recipe_runs_and_its_card_snippet_works(tmp_path, monkeypatch):
    """`trainer/configs/stage3.yaml` as shipped names data, media and a model that exist; one step of it
    trains, and the usage snippet of the card it writes runs on the output."""
    recipe = yaml.safe_load((REPO_ROOT / "trainer" / "configs" / "stage3.yaml").read_text())
    for key in ("model", "data", "data_root"):
        assert (REPO_ROOT / recipe[key]).exists(), f"stage3.yaml: {key} {recipe[key]} does not exist"
    assert "python -m trainer --config trainer/configs/stage3.yaml" in readme_training_commands()
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "example"
    trainer = main(["--config", "trainer/configs/stage3.yaml", "--output_dir", str(out), "--max_steps", "1",
                    "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"])
    assert trainer.state.global_step == 1 and (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "`examples/data/train.jsonl` (6 rows)" in card
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace('"photo.png"', repr(str(REPO_ROOT / "examples" / "media" / "shapes.png")))
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    # The saved tokenizer config names no remote code of its own (AutoTokenizer's prompt comes from config.json).
    assert "AutoTokenizer" not in json.loads((out / "tokenizer_config.json").read_text()).get("auto_map", {})


def test_readme_training_python_block_runs(tmp_path, monkeypatch):
    """The Training section's Python example, from the repository root, into a temporary folder."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Training"):]
    block = section.split("```python\n")[1].split("```")[0]
    assert 'output_dir="outputs/example-python"' in block
    monkeypatch.chdir(REPO_ROOT)
    namespace = {}
    exec(compile(block.replace("outputs/example-python", str(tmp_path / "out")), "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["trainer"].state.global_step >= 1 and (tmp_path / "out" / "model.safetensors").exists()
