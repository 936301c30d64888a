"""Benchmark 5: training throughput of packed multimodal batches vs TRL's padded collator.

The same mixed-length multimodal samples (an image or a short video each, text lengths drawn
log-uniformly) go through the same model in batches of the same samples:

* packed: `trainer.data.pack_samples`, the trainer's packing collator after encoding: one
  padding-free row per batch, positions restarting per sample, no attention mask, and the
  attention the trainer uses for packed rows (`trainer.trainers.use_packed_attention`: under sdpa,
  one causal call per sample);
* padded: TRL's `DataCollatorForLanguageModeling` (right padding to the longest sample, attention
  mask), with the batch's visual tensors concatenated exactly as the trainer does, under sdpa.

Both sides start from the same weights (two copies of one model, one optimizer each).

One timed round is an accumulation step: forward and backward of every batch, then one AdamW
update (as with gradient accumulation; at this toy scale a per-batch update would cost as much as
the batch itself and hide the difference). Throughput counts real (non-pad) tokens per second.
Both collations must give the same loss on the first batch, which the benchmark checks.
"""

import copy
from dataclasses import dataclass

import numpy as np
import torch

from bench.common import Row, Stat, alternate, spec_model

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainSpec:
    hidden: int = 384
    heads: int = 6
    kv_heads: int = 2
    mlp: int = 1024
    layers: int = 4
    vocab: int = 4096
    vision_hidden: int = 256
    vision_layers: int = 2
    samples: int = 8
    batch: int = 4
    min_text: int = 32
    max_text: int = 768


FULL = TrainSpec()
TOY = TrainSpec(hidden=64, heads=4, kv_heads=2, mlp=128, layers=1, vocab=512, vision_hidden=32, vision_layers=1,
                samples=2, batch=2, min_text=8, max_text=32)


def make_samples(spec: TrainSpec, image_token: int, text_ids: np.ndarray):
    """Encoded samples: an image (merge 1) or a 4-frame video (merge 2, part pruned), then text."""
    from trainer.data import EncodedSample

    rng = np.random.default_rng(0)
    samples = []
    for index in range(spec.samples):
        if index % 2 == 0:
            t, h, w, m = 1, int(rng.choice([8, 12])), int(rng.choice([8, 12])), 1
        else:
            t, h, w, m = 4, 8, 8, 2
        merged = t * (h // m) * (w // m)
        keep = torch.ones(merged, dtype=torch.bool)
        if t > 1:
            keep[(h // m) * (w // m):] = torch.from_numpy(rng.random(merged - (h // m) * (w // m)) < 0.6)
        text = int(np.exp(rng.uniform(np.log(spec.min_text), np.log(spec.max_text))))
        prompt = rng.choice(text_ids, 8).tolist() + [image_token] * int(keep.sum()) + rng.choice(text_ids, text // 2).tolist()
        answer = rng.choice(text_ids, text - text // 2).tolist()
        input_ids = torch.tensor(prompt + answer)
        labels = torch.tensor([IGNORE_INDEX] * len(prompt) + answer)
        samples.append(EncodedSample(
            index, input_ids, labels,
            pixel_values=torch.randn(t * h * w, 3 * 14 * 14),
            grid_sizes=torch.tensor([[t, h, w]]),
            merge_sizes=torch.tensor([m]),
            compression_mask=keep,
        ))
    return samples


def build(spec: TrainSpec):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from trainer.data import cat_visual, pack_samples

    tok, config, model = spec_model(spec)
    model.train()
    text_ids = np.arange(256)  # byte tokens of the tiny tokenizer; specials (incl. <image>) excluded
    samples = make_samples(spec, config.image_token_index, text_ids)
    groups = [samples[i : i + spec.batch] for i in range(0, len(samples), spec.batch)]
    trl_collator = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    padded = [
        {**trl_collator([{"input_ids": s.input_ids.tolist(), "labels": s.labels.tolist()} for s in g]), **cat_visual(g)}
        for g in groups
    ]
    packed = [pack_samples(g) for g in groups]
    return model, padded, packed, sum(s.input_ids.numel() for s in samples)


def run(spec: TrainSpec = FULL, repeats: int = 3) -> list[Row]:
    from trainer.trainers import use_packed_attention

    model, padded, packed, tokens = build(spec)
    ours = copy.deepcopy(model)
    use_packed_attention(ours)
    # `use_cache=False` as TRL's `SFTTrainer.compute_loss` passes: with a cache, transformers does not
    # read sample boundaries from `position_ids` and packed samples would attend to each other.
    with torch.no_grad():
        loss_padded = model(**padded[0], use_cache=False).loss.item()
        loss_packed = ours(**packed[0], use_cache=False).loss.item()
    if abs(loss_padded - loss_packed) > 1e-3 * abs(loss_padded):
        raise RuntimeError(f"packed and padded losses differ: {loss_packed} vs {loss_padded}")
    sides = {"packed": (ours, packed), "padded": (model, padded)}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5) for name, (m, _) in sides.items()}

    def accumulation_step(name, first=None):
        m, batches = sides[name]
        for batch in batches[:first]:
            m(**batch, use_cache=False).loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)

    accumulation_step("packed", 1), accumulation_step("padded", 1)  # warm-up: allocator, optimizer state
    stats = alternate({name: (lambda name=name: accumulation_step(name)) for name in sides}, repeats, warmup=0)
    rate = {name: Stat([tokens / t for t in s.values]) for name, s in stats.items()}
    padded_tokens = sum(b["input_ids"].numel() for b in padded)
    case = (f"{spec.layers}x{spec.hidden} Qwen2 + vision, {spec.samples} samples in batches of {spec.batch}, "
            f"{tokens} tokens ({padded_tokens} padded)")
    return [
        Row("5 training throughput", case, "tok/s", rate["packed"], rate["padded"], "TRL padded collator", ">= 1.5",
            higher_is_better=True, note=f"first-batch loss packed {loss_packed:.5f} vs padded {loss_padded:.5f}; "
            f"packed attention: {ours.config._attn_implementation}"),
    ]
