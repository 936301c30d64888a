"""Core model: parity with transformers' native port, batching, generation, loading, memory shape."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from tools.oracle import image, native_inputs, native_twin, our_inputs, packed_inputs, video
from tools.tiny import tiny_config, tiny_tokenizer
from tools.local import REPO_ROOT, remote_module

M = remote_module("modeling_videollama3")
REMOTE_FILES = ["configuration_videollama3.py", "modeling_videollama3.py"]
TOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return M.Videollama3Qwen2ForCausalLM(tiny_config(tok)).eval()


@pytest.fixture(scope="module")
def video_token(tok):
    return tok.convert_tokens_to_ids("<|stream_start|>")


@pytest.fixture(scope="module")
def native(model, video_token):
    return native_twin(model, video_token)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def parity(model, native, tok, video_token, items, text="What is shown?"):
    torch.manual_seed(1)
    ours = logits(model, our_inputs(tok, [(items, text)], model.config.image_token_index))
    theirs = logits(native, native_inputs(tok, items, text, model.config.image_token_index, video_token))
    return (ours - theirs).abs().max().item()


CASES = {
    "image": lambda: [image(4, 6)],
    "video_all_kept": lambda: [video(4, 4, 6)],
    "video_keep_mask": lambda: [video(5, 6, 4, keep_fraction=0.4)],
    "image_and_video": lambda: [image(6, 2), video(3, 4, 4, keep_fraction=0.5)],
    "text_only": lambda: [],
    "two_videos_and_image": lambda: [video(3, 4, 6), image(5, 3), video(5, 2, 4, keep_fraction=0.5)],
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_native_port(model, native, tok, video_token, case):
    torch.manual_seed(2)
    diff = parity(model, native, tok, video_token, CASES[case]())
    assert diff < TOL, f"{case}: max |diff| {diff:.2e}"


def test_left_padded_batch_matches_each_sample_alone_and_native(model, native, tok, video_token):
    torch.manual_seed(3)
    samples = [([image(4, 4), video(3, 4, 4, keep_fraction=0.5)], "Describe both."), ([image(2, 6)], "Hi")]
    img = model.config.image_token_index
    batch = our_inputs(tok, samples, img, padding_side="left")
    batched = logits(model, batch)
    for b, (items, text) in enumerate(samples):
        alone = logits(model, our_inputs(tok, [(items, text)], img))
        n = alone.shape[1]
        assert (batched[b, -n:] - alone[0]).abs().max() < TOL
        theirs = logits(native, native_inputs(tok, items, text, img, video_token))
        assert (batched[b, -n:] - theirs[0]).abs().max() < TOL


def test_eager_equals_sdpa(tok):
    torch.manual_seed(4)
    config = tiny_config(tok)
    # Separate config objects: `_from_config` writes the implementation into the one it is given.
    sdpa = M.Videollama3Qwen2ForCausalLM._from_config(tiny_config(tok), attn_implementation="sdpa").eval()
    eager = M.Videollama3Qwen2ForCausalLM._from_config(tiny_config(tok), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    for model, implementation in ((sdpa, "sdpa"), (eager, "eager")):
        assert model.model.vision_encoder.config._attn_implementation == implementation
        assert model.model.layers[0].self_attn.config._attn_implementation == implementation
    items = [image(4, 6), video(4, 4, 4, keep_fraction=0.5)]
    inputs = our_inputs(tok, [(items, "x")], config.image_token_index)
    assert (logits(sdpa, inputs) - logits(eager, inputs)).abs().max() < TOL


def test_greedy_generate_matches_native(model, native, tok, video_token):
    torch.manual_seed(5)
    items = [image(4, 4), video(3, 4, 4, keep_fraction=0.5)]
    img = model.config.image_token_index
    ours_in = our_inputs(tok, [(items, "Say")], img)
    theirs_in = native_inputs(tok, items, "Say", img, video_token)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    ours = model.generate(**ours_in, **kwargs)
    theirs = native.generate(**theirs_in, **kwargs)
    prompt = ours_in["input_ids"].shape[1]
    assert ours.shape[1] == prompt + 10  # transformers convention: prompt + new tokens
    assert torch.equal(ours[:, prompt:], theirs[:, prompt:])


@pytest.mark.parametrize("mode", [dict(num_beams=3), dict(num_return_sequences=2, num_beams=2)])
def test_expanded_generation_keeps_visual_inputs_per_sample(model, tok, mode):
    torch.manual_seed(6)
    samples = [([image(4, 4), video(3, 4, 4, keep_fraction=0.5)], "A"), ([video(2, 2, 4)], "Bee")]
    img = model.config.image_token_index
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, **mode)
    batched = model.generate(**our_inputs(tok, samples, img), **kwargs)
    per_sample = batched.shape[0] // len(samples)
    for b, sample in enumerate(samples):
        alone = model.generate(**our_inputs(tok, [sample], img), **kwargs)
        got = batched[b * per_sample : (b + 1) * per_sample, -6:]
        assert torch.equal(got, alone[:, -6:])


def test_consecutive_generate_calls_are_independent(model, tok):
    torch.manual_seed(7)
    img = model.config.image_token_index
    first = our_inputs(tok, [([video(3, 4, 4)], "one")], img)
    second = our_inputs(tok, [([image(6, 4)], "two")], img)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    reference = model.generate(**second, **kwargs)
    model.generate(**first, **kwargs)
    assert torch.equal(model.generate(**second, **kwargs), reference)


def test_placeholder_feature_mismatch_names_both_counts(model, tok):
    inputs = our_inputs(tok, [([image(4, 4)], "x")], model.config.image_token_index)
    inputs["input_ids"] = inputs["input_ids"][:, 3:]
    inputs["attention_mask"] = inputs["attention_mask"][:, 3:]
    keep = inputs["input_ids"] == model.config.image_token_index
    inputs["input_ids"][0, keep[0].nonzero()[0]] = tok.convert_tokens_to_ids("a")
    with pytest.raises(ValueError, match=r"tokens: 15, features 16"):
        model(**inputs)


def test_placeholders_without_pixels_raise(model, tok):
    inputs = our_inputs(tok, [([image(2, 2)], "x")], model.config.image_token_index)
    for name in ("pixel_values", "grid_sizes", "merge_sizes", "compression_mask"):
        inputs.pop(name)
    with pytest.raises(ValueError, match=r"tokens: 4, features 0"):
        model(**inputs)


def test_bad_grid_and_mask_raise(model, tok):
    inputs = our_inputs(tok, [([video(2, 4, 4)], "x")], model.config.image_token_index)
    bad = dict(inputs, grid_sizes=torch.tensor([[2, 4, 6]]))
    with pytest.raises(ValueError, match="pixel_values has 32 patches but grid_sizes describe 48"):
        model(**bad)
    bad = dict(inputs, grid_sizes=torch.tensor([[2, 2, 8]]), merge_sizes=torch.tensor([3]))
    with pytest.raises(ValueError, match="not a positive multiple of merge size 3"):
        model(**bad)
    bad = dict(inputs, compression_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="compression_mask has 5 entries but the visual inputs give 8"):
        model(**bad)


def test_vision_attention_never_spans_frames(tok, monkeypatch):
    """Every attention call sees one frame per batch row: memory grows linearly with frames."""
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((tuple(query.shape), attention_mask))
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_test", recording)
    torch.manual_seed(8)
    model = M.Videollama3Qwen2ForCausalLM(tiny_config(tok)).eval()
    model.model.vision_encoder.set_attn_implementation("recording_test")
    monkeypatch.setattr(M, "ATTENTION_CHUNK_SCORES", 2 * 24 * 24 * 7)  # 7 frames' scores per call
    items = [video(30, 4, 6), image(6, 6)]
    inputs = our_inputs(tok, [(items, "x")], model.config.image_token_index)
    reference = logits(model, inputs)
    per_layer = len(seen) // 2
    shapes = [shape for shape, _ in seen[:per_layer]]
    assert shapes == [(7, 2, 24, 16)] * 4 + [(2, 2, 24, 16), (1, 2, 36, 16)]
    assert all(mask is None for _, mask in seen)
    model.model.vision_encoder.set_attn_implementation("sdpa")
    assert (logits(model, inputs) - reference).abs().max() < TOL


def test_cpu_inference_in_frame_groups_equals_one_pass(tok, monkeypatch):
    """CPU inference takes groups of whole frames through all encoder layers: the same bits as one
    pass over all patches (what training and GPUs run), for groups that split a video, join items,
    and hold one frame larger than the group size."""
    monkeypatch.setattr(M, "INFERENCE_GROUP_TOKENS", 40)
    torch.manual_seed(20)
    encoder = M.Videollama3Qwen2ForCausalLM(tiny_config(tok)).model.vision_encoder.eval()
    items = [video(7, 4, 6), image(8, 8), image(2, 4), video(3, 4, 4)]
    inputs = our_inputs(tok, [(items, "x")], tok.convert_tokens_to_ids("<image>"))
    args = inputs["pixel_values"], inputs["grid_sizes"], inputs["merge_sizes"]
    groups = M.frame_groups([tuple(g) for g in inputs["grid_sizes"].tolist()], 40)
    assert [end - start for start, end, _ in groups] == [24] * 7 + [64, 40, 16]
    one_pass = encoder(*args).detach()  # grad enabled: the whole-tensor path
    with torch.no_grad():
        assert torch.equal(encoder(*args), one_pass)


def test_vision_training_over_many_chunks_matches_each_image_alone(tok):
    """Items of five sizes in one training forward (pieces by split, outputs by cat), frames of one
    length sharing a chunk across items (a 4x6 and a 6x4 image; a 2x8 image and a video's 4x4
    frames): outputs and pixel gradients are those of each item encoded on its own."""
    torch.manual_seed(21)
    encoder = M.Videollama3Qwen2ForCausalLM(tiny_config(tok)).model.vision_encoder.train()
    items = [image(2, 2), image(4, 6), image(6, 4), image(2, 8), video(3, 4, 4)]
    inputs = our_inputs(tok, [(items, "x")], tok.convert_tokens_to_ids("<image>"))
    grids, merges = inputs["grid_sizes"], inputs["merge_sizes"]
    plan = M.VisionAttentionPlan.from_grids([tuple(g) for g in grids.tolist()], 2, "cpu")
    assert [(frames, length) for _, frames, length in plan.chunks] == [(1, 4), (2, 24), (4, 16)]

    def pixel_gradient(pixels, grid, merge):
        pixels = pixels.clone().requires_grad_(True)
        out = encoder(pixels, grid, merge)
        out.square().sum().backward()  # a sum over tokens: each image's gradient is its own
        return out.detach(), pixels.grad

    together = pixel_gradient(inputs["pixel_values"], grids, merges)
    alone = [pixel_gradient(pixels, grids[i : i + 1], merges[i : i + 1])
             for i, pixels in enumerate(inputs["pixel_values"].split(grids.prod(1).tolist()))]
    torch.testing.assert_close(together[0], torch.cat([o for o, _ in alone]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(together[1], torch.cat([g for _, g in alone]), atol=1e-6, rtol=1e-5)


def varlen_reference_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, is_causal=False,
                               cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """flash-attention's varlen contract on CPU: `(1, H, N, hd)` in, `(1, N, H, hd)` out, one sdpa per sequence."""
    assert attention_mask is None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    bounds = cu_seq_lens_q.tolist()
    assert cu_seq_lens_q.dtype == torch.int32 and bounds[-1] == query.shape[2]
    assert max_length_q == max_length_k == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    outputs = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], scale=scaling, is_causal=is_causal)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]  # each (1, H, L, hd)
    return torch.cat(outputs, dim=2).transpose(1, 2), None  # (1, N, H, hd)


def test_vision_flash_branch_matches_sdpa_with_gradients(tok, monkeypatch):
    """The vision encoder's flash-attention branch (chunked RoPE, one varlen call) run on CPU through
    a reference with flash-attention's varlen contract: the same logits and gradients as sdpa."""
    AttentionInterface.register("flash_attention_varlen_reference", varlen_reference_attention)
    monkeypatch.setattr(M, "ATTENTION_CHUNK_SCORES", 2 * 24 * 24 * 3)  # several RoPE chunks per video
    torch.manual_seed(19)
    sdpa = M.Videollama3Qwen2ForCausalLM(tiny_config(tok))
    flash = M.Videollama3Qwen2ForCausalLM(tiny_config(tok))
    flash.load_state_dict(sdpa.state_dict())
    # Written directly: set_attn_implementation treats a "flash_attention*" name as a kernel to load.
    flash.model.vision_encoder.config._attn_implementation = "flash_attention_varlen_reference"
    items = [video(7, 4, 6), image(6, 4), video(2, 4, 4, keep_fraction=0.5)]
    inputs = our_inputs(tok, [(items, "x")], sdpa.config.image_token_index)
    inputs["labels"] = inputs["input_ids"].clone()
    grads = []
    for model in (sdpa, flash):
        model.train()
        loss = model(**inputs).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() < 1e-5, name
    del inputs["labels"]
    assert (logits(flash.eval(), inputs) - logits(sdpa.eval(), inputs)).abs().max() < TOL


def test_untied_lm_head(tok):
    torch.manual_seed(9)
    model = M.Videollama3Qwen2ForCausalLM(tiny_config(tok, tie_word_embeddings=False))
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    native = native_twin(model, tok.convert_tokens_to_ids("<|stream_start|>"))
    items = [image(2, 4)]
    img = model.config.image_token_index
    ours = logits(model.eval(), our_inputs(tok, [(items, "x")], img))
    theirs = logits(native, native_inputs(tok, items, "x", img, None))
    assert (ours - theirs).abs().max() < TOL


def save_hub_folder(model, path):
    model.save_pretrained(path)
    for name in REMOTE_FILES:  # save_pretrained copies the remote code next to the weights
        assert (path / name).read_text() == (REPO_ROOT / name).read_text()


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText])
def test_save_and_auto_load_round_trip(model, tok, tmp_path, auto_class):
    save_hub_folder(model, tmp_path)
    loaded = auto_class.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "Videollama3Qwen2ForCausalLM"
    assert type(loaded.model).__name__ == "Videollama3Qwen2Model"
    torch.manual_seed(10)
    inputs = our_inputs(tok, [([image(4, 4), video(3, 4, 4, keep_fraction=0.5)], "x")], model.config.image_token_index)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    out = loaded.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_loads_official_checkpoint_layout(model, tok, tmp_path):
    """An official-format folder: flat config.json with its own auto_map, official key names."""
    config = model.config
    vision = config.vision_encoder_config
    official = {
        "architectures": ["Videollama3Qwen2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_videollama3.Videollama3Qwen2Config",
            "AutoModelForCausalLM": "modeling_videollama3.Videollama3Qwen2ForCausalLM",
        },
        "model_type": "videollama3_qwen2",
        "hidden_act": "silu", "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
        "num_key_value_heads": config.num_key_value_heads, "vocab_size": config.vocab_size,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 4096,
        "max_window_layers": 21, "sliding_window": 32768, "use_sliding_window": False, "tie_word_embeddings": True,
        "torch_dtype": "float32", "transformers_version": "4.46.3", "use_cache": False,
        "image_token_index": config.image_token_index, "mm_projector_type": "mlp2x_gelu",
        "use_token_compression": True, "mm_hidden_size": vision.hidden_size,
        "vision_encoder": "DAMO-NLP-SG/SigLIP-NaViT",
        "vision_encoder_config": {
            "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
            "model_type": "videollama3_vision_encoder", "num_attention_heads": vision.num_attention_heads,
            "num_hidden_layers": vision.num_hidden_layers, "patch_size": 14,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for name in REMOTE_FILES:
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    torch.manual_seed(11)
    inputs = our_inputs(tok, [([video(2, 4, 4)], "x")], config.image_token_index)
    assert torch.equal(logits(loaded.eval(), inputs), logits(model, inputs))
    # The official config says use_cache false (a training leftover): generation still caches.
    out = loaded.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert out.cache is not None and out.cache.get_seq_length() > 0


def test_attn_implementation_and_dtype_reach_vision_encoder(model, tmp_path):
    save_hub_folder(model, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, trust_remote_code=True, attn_implementation="eager", dtype=torch.bfloat16
    )
    assert loaded.model.vision_encoder.config._attn_implementation == "eager"
    assert loaded.model.vision_encoder.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.config._attn_implementation == "eager"


def test_gradient_checkpointing_gives_same_gradients(tok):
    torch.manual_seed(12)
    config = tiny_config(tok)
    items = [image(4, 4), video(3, 4, 4, keep_fraction=0.5)]
    inputs = our_inputs(tok, [(items, "grad")], config.image_token_index)
    inputs["labels"] = inputs["input_ids"].clone()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(13)
        model = M.Videollama3Qwen2ForCausalLM(config).train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_activation_checkpointing
        model(**inputs).loss.backward()
        grads.append(model.model.vision_encoder.encoder.layers[0].self_attn.q_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_text_only_training_batch_runs_vision_tower_with_zero_effect(model, tok):
    inputs = our_inputs(tok, [([], "only text here")], model.config.image_token_index)
    inputs["labels"] = inputs["input_ids"].clone()
    torch.manual_seed(14)
    trained = M.Videollama3Qwen2ForCausalLM(model.config)
    trained.load_state_dict(model.state_dict())
    trained.train()
    loss = trained(**inputs).loss
    loss.backward()
    grad = trained.model.vision_encoder.encoder.layers[0].mlp.fc1.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0  # ran, contributed nothing
    with torch.no_grad():
        assert torch.equal(loss.detach(), trained.eval()(**inputs).loss)


def test_peft_lora_wraps_and_trains_one_step(model, tok):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(15)
    base = M.Videollama3Qwen2ForCausalLM(model.config)
    base.load_state_dict(model.state_dict())
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )
    peft_model = get_peft_model(base, lora)
    assert not any("vision_encoder" in n for n, _ in peft_model.named_parameters() if "lora_" in n)
    inputs = our_inputs(tok, [([image(4, 4)], "lora")], model.config.image_token_index)
    inputs["labels"] = inputs["input_ids"].clone()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    peft_model(**inputs).loss.backward()
    optimizer.step()
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash_attention_2 needs CUDA")
def test_flash_attention_2_matches_sdpa(tok):
    pytest.importorskip("flash_attn")
    torch.manual_seed(16)
    config = tiny_config(tok)
    sdpa = M.Videollama3Qwen2ForCausalLM._from_config(tiny_config(tok), attn_implementation="sdpa")
    sdpa = sdpa.to("cuda", torch.bfloat16).eval()
    flash = M.Videollama3Qwen2ForCausalLM._from_config(tiny_config(tok), attn_implementation="flash_attention_2")
    flash = flash.to("cuda", torch.bfloat16).eval()
    flash.load_state_dict(sdpa.state_dict())
    inputs = our_inputs(tok, [([image(4, 6), video(6, 4, 4, keep_fraction=0.5)], "x")], config.image_token_index)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    assert (logits(sdpa, inputs).float() - logits(flash, inputs).float()).abs().max() < 5e-2



def test_packed_row_in_training_matches_samples_alone(model, tok):
    """Packed samples (position_ids restarting, no attention_mask) must not see each other, in
    training and evaluation, when the caller passes no `use_cache` (a cache would make
    transformers ignore the boundaries)."""
    torch.manual_seed(17)
    img = model.config.image_token_index
    samples = [([image(4, 4)], "first"), ([video(3, 4, 4, keep_fraction=0.5)], "second sample")]
    alone, packed = packed_inputs(tok, samples, img)
    for training in (True, False):
        model.train(training)
        try:
            with torch.no_grad():
                packed_logits = model(**packed).logits
                expected = torch.cat([model(**a).logits for a in alone], dim=1)
        finally:
            model.eval()
        assert (packed_logits - expected).abs().max() < TOL, f"training={training}"


def test_packed_sdpa_attends_per_sample_with_sdpas_gradients(model, tok):
    """`PACKED_SDPA` (one causal sdpa call per packed sample) computes what sdpa's block-diagonal
    mask computes: the same logits as each sample alone and the same gradients; padded batches
    keep sdpa's own masks."""
    import copy

    torch.manual_seed(18)
    img = model.config.image_token_index
    samples = [([image(4, 4)], "first"), ([video(3, 4, 4, keep_fraction=0.5)], "second sample"), ([], "third")]
    alone, packed = packed_inputs(tok, samples, img)
    packed["labels"] = packed["input_ids"].clone()
    ours = copy.deepcopy(model)
    ours.set_attn_implementation(M.PACKED_SDPA)
    assert model.config._attn_implementation == "sdpa"
    losses, grads = [], []
    for candidate in (model, ours):
        candidate.train()
        try:
            loss = candidate(**packed).loss
            loss.backward()
        finally:
            candidate.eval()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in candidate.named_parameters() if p.grad is not None})
        candidate.zero_grad(set_to_none=True)
    assert abs(losses[0] - losses[1]) < TOL
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max() < 1e-4, name
    with torch.no_grad():
        del packed["labels"]
        expected = torch.cat([ours(**a).logits for a in alone], dim=1)
        assert (ours(**packed).logits - expected).abs().max() < TOL
        batch = our_inputs(tok, samples[:2], img)  # left-padded, with an attention mask
        assert (ours(**batch).logits - model(**batch).logits).abs().max() < TOL


def test_packed_sdpa_refuses_boundaries_for_a_padded_batch(model):
    query = torch.zeros(2, 4, 6, 8)
    with pytest.raises(ValueError, match="one packed row, but the batch has 2 rows"):
        M.packed_sdpa_attention(model.model.layers[0].self_attn, query, query, query, None,
                                cu_seq_lens_q=torch.tensor([0, 3, 6], dtype=torch.int32))


@pytest.mark.parametrize("shape", [(300, 4, 16), (1000, 16, 72)])
def test_vision_rope_rounds_like_the_textbook_form(shape):
    """`rotate` must equal `x * cos + rotate_half(x) * sin` bit for bit, forward and backward: the
    tiny recipe is deterministic, and a 1e-7 difference (a fused multiply-add) changes the trained
    default's answers."""
    torch.manual_seed(21)
    n, H, hd = shape
    x = torch.randn(n, H, hd, requires_grad=True)
    angles = torch.randn(n, 1, hd // 2).repeat(1, 1, 2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.chunk(2, dim=-1)
    textbook = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    ours = M.rotate(x, cos, torch.cat((-sin[..., : hd // 2], sin[..., hd // 2 :]), dim=-1))
    grad = torch.randn_like(ours)
    assert torch.equal(ours, textbook)
    assert torch.equal(*(torch.autograd.grad(y, x, grad)[0] for y in (ours, textbook)))


def bad_visual_inputs(tok, model):
    """One image and one video; the visual inputs of a sample the model accepts."""
    torch.manual_seed(22)
    return our_inputs(tok, [([image(2, 4), video(2, 4, 4)], "x")], model.config.image_token_index)


BAD_VISUAL_INPUTS = {
    "grid (k,2)": (lambda x: dict(x, grid_sizes=x["grid_sizes"][:, :2]), ValueError,
                   r"grid_sizes must have shape \(k, 3\), one \[t, h, w\] row per item, got \(2, 2\)"),
    "grid 1-D": (lambda x: dict(x, grid_sizes=x["grid_sizes"].flatten()), ValueError,
                 r"grid_sizes must have shape \(k, 3\), one \[t, h, w\] row per item, got \(6,\)"),
    "grid (k,4)": (lambda x: dict(x, grid_sizes=F.pad(x["grid_sizes"], (0, 1), value=1)), ValueError,
                   r"grid_sizes must have shape \(k, 3\), one \[t, h, w\] row per item, got \(2, 4\)"),
    "float grid": (lambda x: dict(x, grid_sizes=x["grid_sizes"].float()), TypeError,
                   r"grid_sizes must be an integer tensor, got torch.float32"),
    "merges for 3 items": (lambda x: dict(x, merge_sizes=torch.tensor([1, 2, 2])), ValueError,
                           r"merge_sizes must have shape \(k,\) with k = 2 items of grid_sizes, got \(3,\)"),
    "float merges": (lambda x: dict(x, merge_sizes=x["merge_sizes"].float()), TypeError,
                     r"merge_sizes must be an integer tensor, got torch.float32"),
    "wrong N": (lambda x: dict(x, pixel_values=x["pixel_values"][:-3]), ValueError,
                r"pixel_values has 37 patches but grid_sizes describe 40"),
    "patch width": (lambda x: dict(x, pixel_values=x["pixel_values"][:, :-1]), ValueError,
                    r"pixel_values must have shape \(N, 588\), got \(40, 587\)"),
    "integer pixels": (lambda x: dict(x, pixel_values=x["pixel_values"].long()), TypeError,
                       r"pixel_values must be a floating-point tensor, got torch.int64"),
    "mask length": (lambda x: dict(x, compression_mask=x["compression_mask"][:-1]), ValueError,
                    r"compression_mask has 15 entries but the visual inputs give 16 merged tokens"),
    "float mask": (lambda x: dict(x, compression_mask=x["compression_mask"].float()), TypeError,
                   r"compression_mask must be a bool tensor, got torch.float32"),
}


@pytest.mark.parametrize("case", BAD_VISUAL_INPUTS)
def test_bad_visual_inputs_raise_naming_input_and_counts(model, tok, case, monkeypatch):
    """Each malformed processor output is refused at the model's entry, before the vision encoder runs."""
    make_bad, error, message = BAD_VISUAL_INPUTS[case]
    ran = []
    monkeypatch.setattr(model.model.vision_encoder.encoder, "forward", lambda *a: ran.append(1))
    with pytest.raises(error, match=message):
        model(**make_bad(bad_visual_inputs(tok, model)))
    assert not ran


def test_custom_attention_function_runs_in_llm_and_vision(tok):
    """`set_attn_implementation` with a function registered in transformers' AttentionInterface
    reaches the LLM's and the vision encoder's attention layers, with sdpa's logits."""
    calls = []

    def counting_sdpa(module, query, key, value, attention_mask, **kwargs):
        calls.append(type(module).__name__)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("counting_sdpa_test", counting_sdpa)
    torch.manual_seed(23)
    model = M.Videollama3Qwen2ForCausalLM(tiny_config(tok)).eval()
    inputs = our_inputs(tok, [([image(4, 6), video(3, 4, 4, keep_fraction=0.5)], "x")], model.config.image_token_index)
    reference = logits(model, inputs)
    model.set_attn_implementation("counting_sdpa_test")
    assert model.model.vision_encoder.config._attn_implementation == "counting_sdpa_test"
    assert torch.equal(logits(model, inputs), reference)
    assert calls.count("Qwen2Attention") == model.config.num_hidden_layers
    # vision: one call per layer and attention chunk (the 4x6 image, the video's three 4x4 frames)
    assert calls.count("Videollama3VisionAttention") == 2 * model.config.vision_encoder_config.num_hidden_layers
