"""Training: stage recipes, data formats, labels, packing, freezing, resume, LoRA (tiny models, CPU)."""

import copy
import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainerCallback

from tests.tiny_training import REPLIES, official_rows, save_base, tiny_model, write_jsonl
from tools.tiny import tiny_config
from tools.local import remote_module
from trainer import (
    STAGE_TRAINERS,
    MediaLoadError,
    SampleTooLongError,
    Videollama3SFTConfig,
    build_collator,
    load_records,
    stage_config,
    stage_preset,
)
from trainer.config import STAGES
from trainer.data import (
    INDEX_COLUMN,
    RECORD_COLUMN,
    SKIP_GUARD_MIN_ROWS,
    SampleCache,
    SampleEncoder,
    SampleError,
    TooManySkippedError,
    to_conversation,
)
from trainer.trainers import module_parameters

# ------------------------------------------------------------------------------------------------
# Rows in the messages format; media, official rows, the tiny model and processor are shared
# (tests/tiny_training.py, tests/conftest.py)


def messages_rows():
    """The same samples in the transformers messages format (payloads inline and via columns)."""
    return [
        {"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
            {"role": "assistant", "content": REPLIES[0]},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": [{"type": "text", "text": REPLIES[4]}]}],
         "images": ["noise.png"], "videos": []},
        {"messages": [
            {"role": "user", "content": [{"type": "video", "video": "clip.mp4", "start_time": 0.0, "end_time": 3.0},
                                         {"type": "text", "text": "What happens?"}]},
            {"role": "assistant", "content": REPLIES[1]}],
         "images": [], "videos": []},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLIES[2]}],
         "images": [], "videos": []},
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Compare them."}]},
            {"role": "assistant", "content": REPLIES[3]}],
         "images": ["grey.png"], "videos": ["clip.mp4"]},
    ]


def train_args(tmp_path, media_root, stage=3, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, data_root=str(media_root), max_length=2048, max_steps=1,
        per_device_train_batch_size=2, seed=0, max_frames=4, max_visual_tokens=256, multimodal_packing=False,
    )
    settings.update(overrides)
    return stage_config(stage, **settings)


def records(rows):
    """Rows whose fields mix types (an image as a string here, a list there) as `load_records` stores them."""
    return datasets.Dataset.from_dict({RECORD_COLUMN: [json.dumps(r) for r in rows], INDEX_COLUMN: list(range(len(rows)))})


# ------------------------------------------------------------------------------------------------
# Recipes


def test_stage_presets_differ_only_where_stages_differ():
    presets = {s: stage_preset(s) for s in (1, 2, 3, 4)}
    keys = set().union(*presets.values())
    differing = {k for k in keys if len({json.dumps(presets[s].get(k)) for s in presets}) > 1}
    assert differing == {
        "stage", "trainable_modules", "vision_encoder_learning_rate", "projector_learning_rate",
        "llm_learning_rate", "learning_rate", "image_merge_size", "use_token_compression",
    }
    assert presets[1]["trainable_modules"] == ["vision_encoder", "mm_projector"]
    assert (presets[1]["projector_learning_rate"], presets[1]["vision_encoder_learning_rate"]) == (1e-3, 1e-5)
    assert STAGES[2] == {**STAGES[3], "use_token_compression": False}
    assert STAGES[4] == {**STAGES[3], "image_merge_size": 2}
    config = stage_config(1, output_dir="x", use_cpu=True, bf16=False)
    assert config.max_length == 16384 and config.max_visual_tokens == 10240 and config.max_frames == 180
    assert config.lr_scheduler_type == "cosine" and config.warmup_ratio == 0.03
    assert not config.packing and config.multimodal_packing


def test_config_rejects_unknown_modules_and_policies():
    with pytest.raises(ValueError, match="unknown module"):
        Videollama3SFTConfig(output_dir="x", trainable_modules=["vision_tower"], use_cpu=True)
    with pytest.raises(ValueError, match="media_error_policy"):
        Videollama3SFTConfig(output_dir="x", media_error_policy="ignore", use_cpu=True)
    with pytest.raises(ValueError, match="encoded_sample_cache must be >= 0, got -1"):
        Videollama3SFTConfig(output_dir="x", encoded_sample_cache=-1, use_cpu=True)
    with pytest.raises(ValueError, match=r"dataloader_worker_niceness must be >= 0 .*got -1"):
        Videollama3SFTConfig(output_dir="x", dataloader_num_workers=1, dataloader_worker_niceness=-1, use_cpu=True)
    with pytest.raises(ValueError, match="dataloader_worker_niceness=5 applies to data-loader workers, "
                                         "but dataloader_num_workers=0: set it to 1 or more"):
        Videollama3SFTConfig(output_dir="x", dataloader_worker_niceness=5, use_cpu=True)


# ------------------------------------------------------------------------------------------------
# Data


def test_both_formats_load_and_encode_identically(tmp_path, media_root, processor):
    official = load_records(write_jsonl(tmp_path / "official.jsonl", official_rows()))
    (tmp_path / "messages.json").write_text(json.dumps(messages_rows()))
    messages = load_records(str(tmp_path / "messages.json"))
    # Arrow needs one type per field: in parquet every content is a list of items.
    listed = [{**row, "messages": [{**m, "content": [{"type": "text", "text": m["content"]}]
                                    if isinstance(m["content"], str) else m["content"]} for m in row["messages"]]}
              for row in messages_rows()]
    datasets.Dataset.from_list(listed).to_parquet(str(tmp_path / "messages.parquet"))
    parquet = load_records(str(tmp_path / "messages.parquet"))
    assert len(official) == len(messages) == len(parquet) == 4
    encoder = build_collator(processor, train_args(tmp_path, media_root)).encoder
    for i in range(4):
        a, b, c = encoder(official[i]), encoder(messages[i]), encoder(parquet[i])
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.input_ids, c.input_ids)
        assert torch.equal(a.labels, b.labels)
        assert (a.pixel_values is None) == (b.pixel_values is None)
        if a.pixel_values is not None:
            assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.grid_sizes, b.grid_sizes)
    text_only = encoder(official[2])
    assert text_only.pixel_values is None
    # The official tags became content items, in order, with the trim times on the video.
    items = to_conversation(official[3]).messages[1]["content"]
    assert [item["type"] for item in items] == ["image", "video", "text"]
    assert to_conversation(official[1]).media[0].end_time == 3.0


def test_sample_cache_gives_the_encoded_sample_of_a_row_seen_before(tmp_path, media_root, processor):
    """A row seen again (another index, same content) is served from the cache with its own index;
    the batch equals the uncached one; the least recently used entry leaves first."""
    rows = records(official_rows() + official_rows()[:2])  # rows 4 and 5 repeat rows 0 and 1
    plain = build_collator(processor, train_args(tmp_path, media_root))
    cached = build_collator(processor, train_args(tmp_path, media_root, encoded_sample_cache=3))
    encoder = cached.encoder
    first = [encoder(rows[i]) for i in range(3)]
    again = encoder(rows[4])
    assert again.index == 4 and first[0].index == 0
    assert again.pixel_values is first[0].pixel_values  # not decoded again
    assert len(encoder.cache) == 3
    encoder(rows[3])  # a fourth distinct row evicts the least recently used one (row 1; row 0 was just used)
    assert len(encoder.cache) == 3
    assert encoder(rows[5]).pixel_values is not first[1].pixel_values  # row 1's content was evicted
    for a, b in zip(plain([rows[i] for i in range(6)]).values(), cached([rows[i] for i in range(6)]).values()):
        assert torch.equal(a, b)
    # Media in memory have no content key: two different images of one size are both encoded.
    row = {**messages_rows()[0], INDEX_COLUMN: 0}
    first = encoder({**row, "images": [Image.new("RGB", (84, 56), (200, 0, 0))]})
    second = encoder({**row, "images": [Image.new("RGB", (84, 56), (0, 0, 200))]})
    assert not torch.equal(first.pixel_values, second.pixel_values)
    assert len(encoder.cache) == 3


def test_collator_lowers_a_data_loader_workers_priority_once_and_never_the_main_process(tmp_path, media_root,
                                                                                        processor):
    collator = build_collator(processor, train_args(tmp_path, media_root, dataloader_num_workers=1,
                                                    dataloader_worker_niceness=3))
    rows = records(official_rows())
    before = os.nice(0)
    if before + 3 > 19:
        pytest.skip(f"the tests already run at niceness {before}: a worker could not be lowered by 3")
    collator([rows[2]])
    assert os.nice(0) == before  # called in the main process: its priority stays
    loader = torch.utils.data.DataLoader(rows, batch_size=1, num_workers=1, persistent_workers=True,
                                         collate_fn=lambda batch: (collator(batch), os.nice(0)))
    for _ in range(2):  # two epochs in the one persistent worker: lowered once, not once per batch
        assert [niceness for _, niceness in loader] == [before + 3] * len(rows)
    assert os.nice(0) == before


def test_a_niced_worker_trains_the_same_weights_as_the_main_process(tmp_path, media_root, processor):
    def run(**loading):
        args = train_args(tmp_path, media_root, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                          llm_learning_rate=1e-3, projector_learning_rate=1e-3, vision_encoder_learning_rate=1e-3,
                          encoded_sample_cache=8, **loading)
        trainer = STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=records(official_rows()),
                                    processing_class=processor)
        trainer.train()
        return snapshot(trainer.model)

    main = run()
    worker = run(dataloader_num_workers=1, dataloader_persistent_workers=True, dataloader_worker_niceness=19)
    initial = snapshot(tiny_model(processor))
    assert any(not torch.equal(main[name], initial[name]) for name in main)  # the three steps trained
    assert main.keys() == worker.keys()
    for name in main:
        assert torch.equal(main[name], worker[name]), name


def test_a_shared_sample_cache_serves_only_encoders_that_encode_alike(tmp_path, media_root, processor):
    """Collators sharing one `SampleCache` (stages run in one process) get each other's samples only
    where they would encode them alike: stage 4 merges images 2x2, so it re-encodes the rows with
    images and takes the video-only and text rows from stage 3; its batch equals its own uncached
    one. Other video settings miss on videos only; another image processor config or tokenizer
    misses everywhere."""
    rows = records(official_rows())  # image, video, text, image + video
    shared = SampleCache(32)
    stage3 = build_collator(processor, train_args(tmp_path, media_root), sample_cache=shared)
    encoded = [stage3.encoder(row) for row in rows]
    assert len(shared) == 4
    again = build_collator(processor, train_args(tmp_path, media_root), sample_cache=shared)
    assert all(again.encoder(row).input_ids is sample.input_ids for row, sample in zip(rows, encoded))

    stage4 = build_collator(processor, train_args(tmp_path, media_root, stage=4), sample_cache=shared)
    served = [stage4.encoder(row) for row in rows]
    assert [a.input_ids is b.input_ids for a, b in zip(served, encoded)] == [False, True, True, False]
    assert len(shared) == 6
    uncached = build_collator(processor, train_args(tmp_path, media_root, stage=4))
    for a, b in zip(uncached(rows).values(), stage4(rows).values()):
        assert torch.equal(a, b)

    other_fps = build_collator(processor, train_args(tmp_path, media_root, fps=2.0), sample_cache=shared)
    assert other_fps.encoder(rows[1]).input_ids is not encoded[1].input_ids
    assert other_fps.encoder(rows[2]).input_ids is encoded[2].input_ids  # text: no video settings
    other_images = copy.deepcopy(processor)
    other_images.image_processor.patch_size = 7
    other_tokens = copy.deepcopy(processor)
    other_tokens.tokenizer.add_tokens(["<shape>"])
    for other in (other_images, other_tokens):
        collator = build_collator(other, train_args(tmp_path, media_root), sample_cache=shared)
        assert collator.encoder.fingerprint != stage3.encoder.fingerprint
        assert collator.encoder(rows[2]).input_ids is not encoded[2].input_ids
    with pytest.raises(ValueError, match="max_size=0: a sample cache holds at least one sample"):
        SampleCache(0)


def test_supervised_tokens_are_exactly_assistant_replies(tmp_path, media_root, processor):
    collator = build_collator(processor, train_args(tmp_path, media_root))
    batch = collator([records(official_rows())[i] for i in range(4)])
    tokenizer = processor.tokenizer
    spans = []
    for row_ids, row_labels in zip(batch["input_ids"], batch["labels"]):
        supervised = (row_labels != -100).tolist() + [False]
        start = None
        for position, flag in enumerate(supervised):
            if flag and start is None:
                start = position
            elif not flag and start is not None:
                assert torch.equal(row_ids[start:position], row_labels[start:position])
                spans.append(tokenizer.decode(row_ids[start:position]))
                start = None
    assert spans == [REPLIES[0] + "<|im_end|>", REPLIES[4] + "<|im_end|>", REPLIES[1] + "<|im_end|>",
                     REPLIES[2] + "<|im_end|>", REPLIES[3] + "<|im_end|>"]
    # Every processor output the model needs is passed on.
    assert {"pixel_values", "grid_sizes", "merge_sizes", "compression_mask", "attention_mask"} <= set(batch)


def test_missing_media_names_index_and_path(tmp_path, media_root, processor):
    rows = official_rows()
    rows[2] = {"image": "missing/nowhere.png", "conversations": rows[0]["conversations"]}
    args = train_args(tmp_path, media_root)
    with pytest.raises(MediaLoadError, match=r"sample 2 .*missing/nowhere\.png") as raised:
        STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=records(rows), processing_class=processor)
    assert raised.value.index == 2
    # Under "skip" the row is dropped (counted and logged) before training starts.
    args = train_args(tmp_path, media_root, media_error_policy="skip", max_skipped_fraction=0.5)
    trainer = STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=records(rows),
                                processing_class=processor)
    assert sorted(trainer.train_dataset[INDEX_COLUMN]) == [0, 1, 3]


def test_undecodable_media_fail_or_skip(tmp_path, media_root, processor):
    rows = official_rows()
    rows[1] = {**rows[1], "video": ["broken.mp4"]}
    dataset = records(rows)
    collator = build_collator(processor, train_args(tmp_path, media_root), dataset)
    with pytest.raises(MediaLoadError, match=r"sample 1 .*broken\.mp4") as raised:
        collator([dataset[0], dataset[1]])
    assert "conversation" not in str(raised.value)  # one way of pointing: the sample, then the item in it
    collator = build_collator(processor, train_args(tmp_path, media_root, media_error_policy="skip"), dataset)
    batch = collator([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 2  # replaced by the next usable row
    assert sum(collator.skipped.values()) == 1


def test_over_long_sample_is_an_error_not_a_truncation(tmp_path, media_root, processor):
    dataset = records(official_rows())
    collator = build_collator(processor, train_args(tmp_path, media_root, max_length=40), dataset)
    with pytest.raises(SampleTooLongError, match=r"sample 0.*max_length=40"):
        collator([dataset[0]])
    collator = build_collator(processor, train_args(tmp_path, media_root, max_length=40, media_error_policy="skip"), dataset)
    batch = collator([dataset[0]])
    assert batch["input_ids"].shape[1] <= 40 and collator.skipped["SampleTooLongError"] >= 1


# ------------------------------------------------------------------------------------------------
# Packing


def test_restarting_position_ids_give_a_block_diagonal_causal_mask(processor):
    from transformers.masking_utils import create_causal_mask

    config = tiny_config(processor.tokenizer)
    config._attn_implementation = "sdpa"
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    mask = create_causal_mask(config=config, inputs_embeds=torch.zeros(1, 9, 8), attention_mask=None,
                              cache=None, position_ids=position_ids)
    segment = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    expected = (segment[:, None] == segment[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0].bool() if mask.dtype == torch.bool else mask[0, 0] == 0, expected)


def test_packed_loss_equals_token_weighted_unpacked_loss(tmp_path, media_root, processor):
    dataset = records(official_rows())
    rows = [dataset[i] for i in range(4)]  # image, video, text-only, image+video
    padded = build_collator(processor, train_args(tmp_path, media_root))(rows)
    packed = build_collator(processor, train_args(tmp_path, media_root, multimodal_packing=True))(rows)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist().count(0) == 4

    alone = [build_collator(processor, train_args(tmp_path, media_root))([row]) for row in rows]

    model = tiny_model(processor)
    trainer = STAGE_TRAINERS[3](model=model, args=train_args(tmp_path, media_root), train_dataset=dataset,
                                processing_class=processor)
    model.eval()
    with torch.no_grad():
        loss_packed = trainer.compute_loss(model, dict(packed)).item()
        loss_padded = trainer.compute_loss(model, dict(padded)).item()
        total, count = 0.0, 0
        for single in alone:  # each sample alone, weighted by its supervised tokens
            n = int((single["labels"][:, 1:] != -100).sum())
            total += trainer.compute_loss(model, dict(single)).item() * n
            count += n
        plain_packed = model(**packed).loss.item()  # the model's own (non-fused) loss path
    assert abs(loss_packed - total / count) < 1e-5
    assert abs(loss_packed - loss_padded) < 1e-5
    assert abs(plain_packed - loss_packed) < 1e-5


def test_packing_trains_with_per_sample_attention_and_saves_plain_sdpa(tmp_path, media_root, processor):
    from trainer.trainers import PACKED_SDPA

    dataset = records(official_rows())
    plain = tiny_model(processor)
    STAGE_TRAINERS[3](model=plain, args=train_args(tmp_path, media_root), train_dataset=dataset, processing_class=processor)
    assert plain.config._attn_implementation == "sdpa"
    model = tiny_model(processor)
    args = train_args(tmp_path, media_root, multimodal_packing=True, max_steps=2)
    trainer = STAGE_TRAINERS[3](model=model, args=args, train_dataset=dataset, processing_class=processor)
    assert model.config._attn_implementation == PACKED_SDPA
    trainer.train()
    trainer.save_model(args.output_dir)
    # The choice belongs to this training run, not to the checkpoint: users load it with sdpa.
    assert PACKED_SDPA not in (tmp_path / "out" / "config.json").read_text()
    M = remote_module("modeling_videollama3")
    assert M.Videollama3Qwen2ForCausalLM.from_pretrained(args.output_dir).config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------
# Stages: freezing, optimizer groups, learning


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_one_step_changes_exactly_the_stage_modules(tmp_path, media_root, processor, stage):
    model = tiny_model(processor)
    dataset = records([official_rows()[3]] * 2)  # image + video: every module gets gradients
    args = train_args(tmp_path, media_root, stage=stage, lr_scheduler_type="constant")
    trainer = STAGE_TRAINERS[stage](model=model, args=args, train_dataset=dataset, processing_class=processor)
    groups = module_parameters(model)
    owner = {id(p): name for name, params in groups.items() for p in params}
    before = snapshot(model)
    trainer.train()
    trainable = set(args.trainable_modules)
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (owner[id(p)] in trainable), f"stage {stage}: {name} ({owner[id(p)]}) changed={changed}"
    expected_lrs = {m: args.module_learning_rate(m) for m in trainable}
    for group in trainer.optimizer.param_groups:
        module = group["name"].split(".")[0]
        assert module in trainable and group["initial_lr"] == expected_lrs[module]
        assert group["weight_decay"] == (0.0 if group["name"].endswith("no_decay") else args.weight_decay)
    assert {g["name"].split(".")[0] for g in trainer.optimizer.param_groups} == trainable
    # Each trained module's learning rate is logged, not only the first group's.
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert {k: v for k, v in logged.items() if k.startswith("learning_rate/")} == {
        f"learning_rate/{m}": lr for m, lr in expected_lrs.items()}


def test_loss_falls_over_30_steps(tmp_path, media_root, processor):
    losses = []

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    args = train_args(tmp_path, media_root, max_steps=30, learning_rate=2e-3, llm_learning_rate=2e-3,
                      projector_learning_rate=2e-3, vision_encoder_learning_rate=2e-4, warmup_ratio=0.0,
                      multimodal_packing=True)
    trainer = STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=records(official_rows()),
                                processing_class=processor, callbacks=[Record()])
    trainer.train()
    assert len(losses) == 30
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.7 * first, losses


def test_text_only_batch_runs_vision_tower_with_zero_contribution(tmp_path, media_root, processor):
    dataset = records(official_rows())
    batch = build_collator(processor, train_args(tmp_path, media_root))([dataset[2]])
    assert "pixel_values" not in batch
    model = tiny_model(processor)
    model.eval()
    with torch.no_grad():
        eval_loss = model(**batch).loss
    model.train()
    calls = []
    handle = model.model.vision_encoder.register_forward_hook(lambda *a: calls.append(1))
    loss = model(**batch).loss
    loss.backward()
    handle.remove()
    assert calls, "the vision tower did not run"
    assert torch.equal(loss.detach(), eval_loss)
    grads = [p.grad for p in model.model.vision_encoder.parameters()]
    assert all(g is not None and not g.any() for g in grads)


# ------------------------------------------------------------------------------------------------
# Resume


def test_resume_after_checkpoint_matches_uninterrupted_run(tmp_path, media_root, processor):
    dataset = records(official_rows())

    def run(output_dir, stop_at=None, resume=False):
        args = train_args(tmp_path, media_root, output_dir=str(output_dir), max_steps=4, save_strategy="steps",
                          save_steps=2, per_device_train_batch_size=1, learning_rate=1e-3, llm_learning_rate=1e-3,
                          projector_learning_rate=1e-3, vision_encoder_learning_rate=1e-3)

        class Interrupt(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if stop_at is not None and state.global_step >= stop_at:
                    control.should_training_stop = True

        trainer = STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=dataset,
                                    processing_class=processor, callbacks=[Interrupt()])
        trainer.train(resume_from_checkpoint=resume or None)
        return trainer

    straight = run(tmp_path / "straight")
    interrupted = run(tmp_path / "resumed", stop_at=2)
    assert interrupted.state.global_step == 2
    resumed = run(tmp_path / "resumed", resume=True)
    assert resumed.state.global_step == 4
    a, b = snapshot(straight.model), snapshot(resumed.model)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    assert (checkpoint / "modeling_videollama3.py").exists() and (checkpoint / "processing_videollama3.py").exists()


# ------------------------------------------------------------------------------------------------
# LoRA


def test_lora_step_save_reload_merge(tmp_path, media_root, processor, caplog):
    import logging

    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    base_dir = save_base(tiny_model(processor), processor, tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True)
    args = train_args(tmp_path, media_root, lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      learning_rate=1e-2, llm_learning_rate=1e-2, projector_learning_rate=1e-2)
    dataset = records([official_rows()[3]] * 2)
    caplog.set_level(logging.INFO, logger="trainer")
    trainer = STAGE_TRAINERS[3](model=model, args=args, train_dataset=dataset, processing_class=processor)
    counts = [r.args[1] for r in caplog.records if r.getMessage().startswith("trainable parameters per module (LoRA")]
    assert counts and counts[0]["llm"] > 0 and counts[0]["vision_encoder"] == 0, counts
    assert counts[0]["mm_projector"] > 0  # trained fully (modules_to_save)
    trainer.train()
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    card = (adapter_dir / "README.md").read_text()
    assert "library_name: peft" in card and "PeftModel.from_pretrained(base, path)" in card
    assert f'AutoModelForImageTextToText.from_pretrained("{base_dir}"' in card and "| `lora_r` | `4` |" in card

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert not [k for k in keys if "vision_encoder" in k], "the default adapter must not touch the vision encoder"
    assert any("mm_projector" in k for k in keys)  # trained fully (modules_to_save)
    assert any("layers.0.self_attn.q_proj.lora_A" in k for k in keys)
    assert any("mlp.down_proj.lora_B" in k for k in keys)

    batch = build_collator(processor, args)([dataset[0]])
    batch.pop("labels")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True),
                                         str(adapter_dir)).eval()
    with torch.no_grad():
        adapter_logits = reloaded(**batch).logits
        trained_logits = trainer.model.eval()(**batch).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(**batch).logits
    base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        base_logits = base(**batch).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(adapter_logits, trained_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=1e-5)


def test_vision_lora_gets_gradients_under_gradient_checkpointing(tmp_path, media_root, processor):
    grads = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, p in model.named_parameters():
                if "vision_encoder" in name and "lora_" in name:
                    grads[name] = None if p.grad is None else p.grad.abs().sum().item()

    args = train_args(tmp_path, media_root, lora=True, lora_vision=True, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, activation_checkpointing=True)
    trainer = STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=records([official_rows()[0]] * 2),
                                processing_class=processor, callbacks=[Capture()])
    trainer.train()
    assert trainer.model.base_model.model.model.vision_encoder.is_activation_checkpointing
    assert grads and all(g is not None for g in grads.values()), grads
    # lora_B starts at zero, so on the first step only it has a non-zero gradient (lora_A's is B^T x ... = 0).
    b_grads = [g for name, g in grads.items() if "lora_B" in name]
    assert b_grads and all(g > 0 for g in b_grads), grads


def test_lora_targets_never_hit_the_vision_encoder_by_default():
    import re

    from trainer.lora import lora_target_regex

    pattern = lora_target_regex()
    assert re.fullmatch(pattern, "model.layers.3.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.layers.0.mlp.gate_proj")
    assert not re.fullmatch(pattern, "model.vision_encoder.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.mm_projector.readout.0")
    assert not re.fullmatch(pattern, "lm_head")
    vision = lora_target_regex(train_vision=True)
    assert re.fullmatch(vision, "model.vision_encoder.encoder.layers.0.self_attn.q_proj")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without CUDA")
def test_qlora_is_refused_without_cuda(tmp_path):
    from trainer.lora import load_model

    args = Videollama3SFTConfig(output_dir=str(tmp_path), lora=True, load_in_4bit=True, use_cpu=True)
    with pytest.raises(RuntimeError, match="QLoRA .*CUDA"):
        load_model(str(tmp_path), args)


# ------------------------------------------------------------------------------------------------
# Bad input: the skipped-rows guard, tag counts, empty files, stage-1 LoRA


def test_skipped_rows_guard_before_training_names_the_first_errors(tmp_path, media_root, processor):
    rows = official_rows()
    for i in (0, 1, 3):  # every media row: only the text row would train
        rows[i] = {**rows[i], "image": [f"gone{i}.png"] * ("image" in rows[i]), "video": [f"gone{i}.mp4"] * ("video" in rows[i])}
    args = train_args(tmp_path, media_root, media_error_policy="skip")
    with pytest.raises(TooManySkippedError, match=r"skipped 3 of 4 rows before training \(75\.0%\), more than "
                                                  r"max_skipped_fraction=5\.0%.*sample 0 \(media '.*gone0\.png'\): "
                                                  r"media file not found"):
        STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=records(rows), processing_class=processor)


def test_skipped_rows_guard_while_encoding(tmp_path, media_root, processor):
    rows = [{**official_rows()[1], "video": ["broken.mp4"]}, official_rows()[2]] * SKIP_GUARD_MIN_ROWS
    dataset = records(rows)
    collator = build_collator(processor, train_args(tmp_path, media_root, media_error_policy="skip"), dataset)
    with pytest.raises(TooManySkippedError, match=r"rows while encoding .*first errors: sample 0 \(media '.*broken\.mp4'\)"):
        for start in range(0, len(dataset), 2):
            collator([dataset[start], dataset[start + 1]])
    assert collator.encoded >= SKIP_GUARD_MIN_ROWS
    # Below the minimum count nothing stops, at the limit nothing stops either.
    lenient = build_collator(processor, train_args(tmp_path, media_root, media_error_policy="skip",
                                                   max_skipped_fraction=0.5), dataset)
    for start in range(0, len(dataset), 2):
        lenient([dataset[start], dataset[start + 1]])
    assert sum(lenient.skipped.values()) == len(dataset) // 2


def test_skipped_rows_guard_at_the_end_of_a_short_run(tmp_path, media_root, processor):
    rows = official_rows()
    rows[1] = {**rows[1], "video": ["broken.mp4"]}  # exists, fails only when decoded
    args = train_args(tmp_path, media_root, media_error_policy="skip", per_device_train_batch_size=4)
    trainer = STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=records(rows),
                                processing_class=processor)
    with pytest.raises(TooManySkippedError, match=r"skipped 1 of \d+ rows while encoding"):
        trainer.train()


def test_more_tags_than_media_is_skipped_under_skip_and_names_file_and_row_under_fail(tmp_path, media_root, processor):
    rows = official_rows()
    rows[0] = {**rows[0], "conversations": [{"from": "human", "value": "<image>\n<image>\nTwo?"},
                                            {"from": "gpt", "value": "No."}]}
    data = write_jsonl(tmp_path / "tags.jsonl", rows)
    dataset = load_records(data)
    with pytest.raises(SampleError, match=rf"{data}, sample 0: has 2 <image> tags but 1 image entries"):
        STAGE_TRAINERS[3](model=tiny_model(processor), args=train_args(tmp_path, media_root), train_dataset=dataset,
                          processing_class=processor)
    args = train_args(tmp_path, media_root, media_error_policy="skip", max_skipped_fraction=0.5)
    trainer = STAGE_TRAINERS[3](model=tiny_model(processor), args=args, train_dataset=dataset, processing_class=processor)
    assert sorted(trainer.train_dataset[INDEX_COLUMN]) == [1, 2, 3]


@pytest.mark.parametrize("name,content", [("empty.jsonl", ""), ("empty.json", ""), ("list.json", "[]"),
                                          ("blank.jsonl", "\n\n")])
def test_a_data_file_without_rows_says_so(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=f"no training rows in {path}"):
        load_records(str(path))


def test_stage1_lora_points_at_lora_vision():
    with pytest.raises(ValueError, match="stage 1 freezes the LLM .*--lora_vision"):
        stage_config(1, output_dir="x", use_cpu=True, lora=True)
    config = stage_config(1, output_dir="x", use_cpu=True, lora=True, lora_vision=True)
    assert config.lora_vision


def test_presets_use_bf16_only_where_the_device_has_it():
    assert stage_preset(3)["bf16"] is None  # the official bf16, resolved per device
    config = stage_config(3, output_dir="x")
    assert config.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def test_processor_defaults_are_not_restated_by_the_trainer(processor):
    """fps, max_frames, the token budget, merge sizes and DiffFP are the processor's unless a recipe sets them."""
    assert SampleEncoder(processor).processor_kwargs() == {}
    config = Videollama3SFTConfig(output_dir="x", use_cpu=True)
    encoder = build_collator(processor, config).encoder
    assert encoder.processor_kwargs() == {}
    preset = stage_config(3, output_dir="x", use_cpu=True)
    assert build_collator(processor, preset).encoder.processor_kwargs() == {
        "fps": 1.0, "max_frames": 180, "image_merge_size": 1, "video_merge_size": 2, "max_tokens": 10240,
        "use_token_compression": True}


def test_trainer_modules_import_without_a_circle():
    """No module of `trainer/` imports another inside a function (how circles hide) and the
    module-level imports form no cycle; no private argparse/logging workarounds."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "trainer"
    graph = {}
    for file in package.glob("*.py"):
        tree = ast.parse(file.read_text())
        top = {node for node in tree.body if isinstance(node, ast.ImportFrom)}
        nested = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level and node not in top]
        assert not nested, f"{file.name} imports {[n.module for n in nested]} inside a function"
        graph[file.stem] = {node.module for node in top if node.level and node.module}
        source = file.read_text()
        assert "._actions" not in source and "logging.Filter" not in source, file.name

    def visit(module, path):
        assert module not in path, f"import circle: {' -> '.join([*path, module])}"
        for imported in graph.get(module, ()):
            visit(imported, [*path, module])

    for module in graph:
        visit(module, [])
