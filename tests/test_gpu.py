"""CUDA paths: device placement, bf16, flash-attention (vision varlen, padded and packed LLM rows,
KV-cache decoding), training from the CLI on a GPU, and the embedded default on a GPU.

Skipped without CUDA (CI has none); `tools/gpu/gpu_check.sh` runs them on a lent GPU. The flash tests
need a `flash_attn` package: the real one, or `tools/gpu/flash_attn_torch` (its API over the
FlashAttention-2 kernels inside PyTorch) where the real one cannot be built.
"""

import copy
import math

import pytest
import torch

from tools.oracle import image, our_inputs, packed_inputs, video
from tools.tiny import tiny_config, tiny_tokenizer
from tools.local import REPO_ROOT, remote_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
M = remote_module("modeling_videollama3")


def needs_flash():
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        pytest.skip("no flash_attn package")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would make fp32 CUDA results differ from CPU by ~1e-3; these tests compare to ~1e-4."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def build(tok, attn, dtype=torch.float32, device="cuda", seed=0):
    torch.manual_seed(seed)
    model = M.Videollama3Qwen2ForCausalLM._from_config(tiny_config(tok), attn_implementation=attn)
    return model.to(device, dtype).eval()


def to(inputs, device, dtype=None):
    out = {k: v.to(device) for k, v in inputs.items()}
    if dtype is not None and "pixel_values" in out:
        out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


SAMPLES = [([image(4, 6), video(5, 4, 4, keep_fraction=0.5)], "Describe both."), ([video(3, 6, 4)], "What moves?")]


def test_cuda_matches_cpu_in_fp32(tok):
    """Every tensor the model makes lands on the input's device: CUDA fp32 = CPU fp32."""
    torch.manual_seed(1)
    inputs = our_inputs(tok, SAMPLES, tok.convert_tokens_to_ids("<image>"))
    for attn in ("sdpa", "eager"):
        cpu = build(tok, attn, device="cpu")
        gpu = build(tok, attn)
        with torch.no_grad():
            expected = cpu(**inputs).logits
            got = gpu(**to(inputs, "cuda")).logits.cpu()
        assert (got - expected).abs().max() < 1e-4, attn
        want = cpu.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert torch.equal(gpu.generate(**to(inputs, "cuda"), max_new_tokens=8, do_sample=False).cpu(), want), attn


def test_flash_attn_package_matches_math_attention():
    """The installed flash_attn (real or stand-in) against plain attention: varlen, GQA, bottom-right causal."""
    needs_flash()
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    torch.manual_seed(2)
    lengths_q, lengths_k, heads, kv_heads, dim = [5, 1, 9], [5, 7, 9], 4, 2, 16
    q = torch.randn(sum(lengths_q), heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(sum(lengths_k), kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0)], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0)], device="cuda", dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True)

    reference = []
    for i in range(len(lengths_q)):
        qi = q[cu_q[i]:cu_q[i + 1]].float().transpose(0, 1)  # (H, Sq, D)
        ki = k[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        vi = v[cu_k[i]:cu_k[i + 1]].float().repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
        scores = qi @ ki.transpose(1, 2) / math.sqrt(dim)  # (H, Sq, Sk)
        sq, sk = scores.shape[1:]
        # Bottom-right alignment: query j sees keys up to j + (Sk - Sq), as flash-attn >= 2.1 does.
        allowed = torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(sk - sq)
        reference.append((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vi).transpose(0, 1))
    reference = torch.cat(reference)
    assert rel_err(out, reference) < 1e-2
    grad = torch.randn_like(reference)
    flash_grads = torch.autograd.grad(out, (q, k, v), grad.bfloat16())
    math_grads = torch.autograd.grad(reference, (q, k, v), grad)
    for name, a, b in zip("qkv", flash_grads, math_grads):
        assert rel_err(a, b) < 2e-2, name

    dense = flash_attn_func(q[None, :5], k[None, :5], v[None, :5], causal=True)  # (1, 5, H, D)
    assert rel_err(dense[0], out[:5]) < 1e-3


def test_flash_matches_sdpa_on_a_padded_batch_and_in_decoding(tok):
    """Vision varlen + LLM unpadding, then KV-cache decoding (one query against many keys)."""
    needs_flash()
    torch.manual_seed(3)
    inputs = to(our_inputs(tok, SAMPLES, tok.convert_tokens_to_ids("<image>")), "cuda", torch.bfloat16)
    sdpa, flash = build(tok, "sdpa", torch.bfloat16), build(tok, "flash_attention_2", torch.bfloat16)
    assert flash.model.vision_encoder.config._attn_implementation == "flash_attention_2"
    with torch.no_grad():
        mask = inputs["attention_mask"].bool()
        assert rel_err(flash(**inputs).logits[mask], sdpa(**inputs).logits[mask]) < 2e-2

        one = to(our_inputs(tok, SAMPLES[:1], tok.convert_tokens_to_ids("<image>")), "cuda", torch.bfloat16)
        for batch in (one, inputs):  # one row; two left-padded rows
            generated = flash.generate(**batch, max_new_tokens=6, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
            steps = len(generated.logits)
            rows = batch["attention_mask"].shape[0]
            extended = torch.cat([batch["attention_mask"], batch["attention_mask"].new_ones(rows, steps)], dim=1)
            scored = {**batch, "input_ids": generated.sequences, "attention_mask": extended}
            prompt = batch["input_ids"].shape[1]
            teacher_forced = sdpa(**scored).logits[:, prompt - 1:-1]  # (B, steps, V)
            assert rel_err(torch.stack(generated.logits, dim=1), teacher_forced) < 2e-2


def test_flash_matches_sdpa_on_a_packed_training_row_with_gradients(tok):
    """Packed samples: flash reads cu_seq_lens, sdpa a block-diagonal mask; loss and every gradient agree."""
    needs_flash()
    torch.manual_seed(4)
    img = tok.convert_tokens_to_ids("<image>")
    _, packed = packed_inputs(tok, [*SAMPLES, ([], "text only")], img)
    packed["labels"] = packed["input_ids"].clone()
    packed = to(packed, "cuda", torch.bfloat16)
    reference = build(tok, "sdpa", torch.float32)
    results = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = copy.deepcopy(reference).to(torch.bfloat16)
        model.set_attn_implementation(attn)
        model.train()
        loss = model(**packed).loss
        loss.backward()
        results[attn] = loss.item(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    (sdpa_loss, sdpa_grads), (flash_loss, flash_grads) = results["sdpa"], results["flash_attention_2"]
    assert abs(sdpa_loss - flash_loss) < 1e-2 * abs(sdpa_loss)
    assert sdpa_grads.keys() == flash_grads.keys()
    assert any(n.startswith("model.vision_encoder.") for n in flash_grads)
    for name in sdpa_grads:
        assert rel_err(flash_grads[name], sdpa_grads[name]) < 5e-2, name


@pytest.mark.parametrize("attn,packing", [("flash_attention_2", True), ("flash_attention_2", False), ("sdpa", True)])
def test_cli_trains_on_cuda_with_gpu_defaults(tmp_path, base_checkpoint, data_path, media_root, attn, packing):
    """bf16 and activation checkpointing switch on by themselves on CUDA; the chosen attention trains."""
    if attn.startswith("flash"):
        needs_flash()
    from trainer.cli import main

    trainer = main([
        "--stage", "3", "--model", base_checkpoint, "--data", data_path, "--data_root", str(media_root),
        "--output_dir", str(tmp_path),
        "--max_steps", "3", "--per_device_train_batch_size", "2", "--max_frames", "4",
        "--max_visual_tokens", "256", "--max_length", "2048", "--report_to", "none", "--save_strategy", "no",
        "--disable_tqdm", "true", "--logging_steps", "1", "--multimodal_packing", str(packing).lower(),
        "--model_init_kwargs", f'{{"attn_implementation": "{attn}"}}',
    ])
    assert trainer.args.bf16 and trainer.args.activation_checkpointing
    assert trainer.model.device.type == "cuda"
    expected = M.PACKED_SDPA if (attn == "sdpa" and packing) else attn
    assert trainer.model.config._attn_implementation == expected
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert (tmp_path / "model.safetensors").exists()


def test_embedded_default_answers_on_cuda_as_on_cpu():
    """The README demo's model and questions: the same greedy answers on a GPU as on the CPU."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    from tests.test_embedded_default import load_demo

    demo = load_demo()
    folder = str(REPO_ROOT / "tiny_model")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    answers = {}
    for device in ("cpu", "cuda"):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).to(device).eval()
        answers[device] = [
            demo.answer(model, processor, kind, entry[kind], question, 32)
            for entry in demo.bundled_examples()
            for kind in ("image", "video") if kind in entry
            for question in entry["questions"]
        ]
    assert len(answers["cpu"]) == 6
    assert answers["cuda"] == answers["cpu"]


def test_tiny_recipe_and_evaluation_run_on_cuda(tmp_path):
    """`python -m recipes.tiny.train_default --device cuda` (every stage, the vision pretraining too) and
    `tools.evaluate_default --device cuda` on the same held-out set as on the CPU."""
    from recipes.tiny import train_default
    from tools import evaluate_default

    out = train_default.main(["--quick", "--device", "cuda", "--out", str(tmp_path / "tiny")])
    assert (out / "model.safetensors").exists()
    held_out = tmp_path / "held_out"
    on = {device: evaluate_default.evaluate(str(out), images=4, videos=2, device=device, data_dir=str(held_out))
          for device in ("cuda", "cpu")}
    totals = {device: {kind: total for kind, (_, total) in r["per_kind"].items()} for device, r in on.items()}
    assert totals["cuda"] == totals["cpu"] and sum(totals["cpu"].values()) > 0
    assert on["cuda"]["video_tokens"] == on["cpu"]["video_tokens"]  # the processor prunes, not the device
