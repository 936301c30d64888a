"""Processor: official chat template, placeholder expansion, batching, masks, loading, bad input,
and the placeholder/feature contract with the tiny model."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoProcessor
from transformers.feature_extraction_utils import BatchFeature

from tests import media
from tests.official_files import OFFICIAL_PREPROCESSOR_CONFIG, OFFICIAL_STYLE_TEMPLATE
from tools.tiny import tiny_tokenizer
from tests.tiny_processor import tiny_processor
from tools.local import REPO_ROOT, remote_module

P = remote_module("processing_videollama3")
IP = remote_module("image_processing_videollama3")
VP = remote_module("video_processing_videollama3")
IMG = "<image>"

# The official processor's rendering of this conversation (DAMO-NLP-SG/VideoLLaMA3, processing_videollama3.py).
GOLDEN_MULTI_TURN = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat colour dominates?<|im_end|>\n"
    "<|im_start|>assistant\nMostly grey noise.<|im_end|>\n"
    "<|im_start|>user\nTime 0.0s:<image>,Time 1.0s:<image>,Time 2.0s:<image>,Time 3.0s:<image>,"
    "Time 4.0s:<image>,Time 5.0s:<image>\nDoes the video match the image?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
SYSTEM = (
    "<|im_start|>system\nYou are VideoLLaMA3 created by Alibaba DAMO Academy, a helpful assistant to help people "
    "understand images and videos.<|im_end|>\n"
)


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def six_second_video(tmp_path_factory):
    return media.write_video(tmp_path_factory.mktemp("v") / "six.mp4", seconds=6, static_seconds=2)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("i") / "photo.png"
    media.photo(60, 90).save(path)
    return str(path)


def multi_turn(video):
    return [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": [{"type": "image", "image": media.noise_image(40, 60)}, {"type": "text", "text": "What colour dominates?"}]},
        {"role": "assistant", "content": "Mostly grey noise."},
        {
            "role": "user",
            "content": [
                {"type": "video", "video": {"video_path": video, "fps": 1, "max_frames": 180}},
                {"type": "text", "text": "Does the video match the image?"},
            ],
        },
    ]


def decoded(processor, ids):
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def static_frames(count=5, height=56, width=84):
    """`count` identical noise frames, then frame 2 with one changed 28x28 block."""
    rng = np.random.default_rng(0)
    frames = np.stack([rng.integers(0, 256, (height, width, 3), dtype=np.uint8)] * count)
    frames[2, :28, :28] ^= 0xFF
    return frames


# ---- golden prompts ------------------------------------------------------------------------------


def test_golden_multi_turn(processor, six_second_video):
    prompt = processor.apply_chat_template(multi_turn(six_second_video), add_system_prompt=True, add_generation_prompt=True)
    assert prompt == GOLDEN_MULTI_TURN


def test_golden_plain_string_without_system_prompt(processor):
    conversation = [{"role": "user", "content": "Hello! Who are you?"}]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|im_start|>user\nHello! Who are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = processor.apply_chat_template(conversation, add_system_prompt=True, add_generation_prompt=True)
    assert with_system == SYSTEM + "<|im_start|>user\nHello! Who are you?<|im_end|>\n<|im_start|>assistant\n"


def test_golden_image(processor):
    conversation = [{"role": "user", "content": [{"type": "image", "image": media.photo(28, 42)}, {"type": "text", "text": "Describe."}]}]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    t, gh, gw = out["grid_sizes"][0].tolist()
    assert decoded(processor, out["input_ids"][0]) == (
        "<|im_start|>user\n" + IMG * (t * gh * gw) + "\nDescribe.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_golden_video_with_pruned_counts(processor):
    video = {"type": "video", "video": static_frames(), "timestamps": [0, 1, 2, 3, 4]}
    conversation = [{"role": "user", "content": [video, {"type": "text", "text": "What changes?"}]}]
    out = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["grid_sizes"].tolist() == [[5, 4, 6]] and out["merge_sizes"].tolist() == [2]
    kept = [6, 1, 1, 1, 1]  # frame 0 whole; static frames keep 1; frame 2's changed block; frame 3 changes it back
    assert out["compression_mask"].view(5, 6).sum(1).tolist() == kept
    frames = ",".join(f"Time {t}.0s:" + IMG * k for t, k in enumerate(kept))
    assert decoded(processor, out["input_ids"][0]) == (
        f"<|im_start|>user\n{frames}\nWhat changes?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_golden_image_and_video(processor):
    image = media.photo(28, 28)
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "video", "video": static_frames(3), "fps": 2},
                {"type": "text", "text": "Same?"},
            ],
        }
    ]
    assert processor.apply_chat_template(conversation) == (
        "<|im_start|>user\n<image>\nTime 0.0s:<image>,Time 0.5s:<image>,Time 1.0s:<image>\nSame?<|im_end|>\n"
    )
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    image_tokens = int(out["grid_sizes"][0].prod())
    video_kept = out["compression_mask"][image_tokens:].view(3, -1).sum(1).tolist()
    expected = (
        "<|im_start|>user\n" + IMG * image_tokens + "\n"
        + ",".join(f"Time {t}s:" + IMG * k for t, k in zip(["0.0", "0.5", "1.0"], video_kept))
        + "\nSame?<|im_end|>\n"
    )
    assert decoded(processor, out["input_ids"][0]) == expected


def test_generation_markers_and_image_timestamp(processor):
    assert "{% generation %}" in processor.chat_template or "{%- generation -%}" in processor.chat_template
    conversation = [{"role": "user", "content": [{"type": "image", "image": "x.png", "timestamp": 3.14}]}]
    assert processor.apply_chat_template(conversation) == "<|im_start|>user\nTime 3.1s: <image>\n<|im_end|>\n"


# ---- calls -----------------------------------------------------------------------------------------


def test_official_call(processor, six_second_video, image_file):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": {"image_path": image_file}}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A person."},
        {
            "role": "user",
            "content": [
                {"type": "video", "video": {"video_path": six_second_video, "fps": 1, "max_frames": 180, "start_time": 1, "end_time": 4}},
                {"type": "text", "text": "What happens?"},
            ],
        },
    ]
    out = processor(conversation=conversation, add_system_prompt=True, add_generation_prompt=True, return_tensors="pt")
    assert isinstance(out, BatchFeature)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "grid_sizes", "merge_sizes", "compression_mask"}
    text = decoded(processor, out["input_ids"][0])
    assert text.startswith(SYSTEM) and "Time 1.0s:" in text and "Time 4.0s:" in text and "Time 5.0s" not in text
    assert out["grid_sizes"][:, 0].tolist() == [1, 4]
    assert (out["input_ids"] == processor.image_token_id).sum() == out["compression_mask"].sum()
    assert out["pixel_values"].shape == (int(out["grid_sizes"].prod(1).sum()), 588)


def test_text_and_images_call(processor):
    images = [media.photo(28, 28), media.photo(56, 28)]
    out = processor(text=["<image>\nOne.", "Two <image> here."], images=images, return_tensors="pt")
    assert out["grid_sizes"].tolist() == [[1, 2, 2], [1, 4, 2]]  # min_tokens 4: 28x28 -> 2x2 patches
    counts = (out["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert counts == [int(out["grid_sizes"][0].prod()), int(out["grid_sizes"][1].prod())]
    assert out["attention_mask"][0, 0] == 0 or out["attention_mask"][1, 0] == 0  # left padding


def test_text_with_video_marker(processor):
    out = processor(text="<video>\nWhat?", videos=[static_frames(3)], return_tensors="pt")
    text = decoded(processor, out["input_ids"][0])
    assert text.startswith("Time 0.0s:<image>") and ",Time 2.0s:" in text and text.endswith("\nWhat?")


@pytest.mark.parametrize("form", ["path", "pil", "array", "path_key", "url_key", "file_url"])
def test_image_content_forms(processor, image_file, form):
    payload = {
        "path": {"image": image_file},
        "pil": {"image": media.photo(60, 90)},
        "array": {"image": np.asarray(media.photo(60, 90))},
        "path_key": {"path": image_file},
        "url_key": {"url": image_file},
        "file_url": {"url": "file://" + image_file},
    }[form]
    conversation = [{"role": "user", "content": [{"type": "image", **payload}, {"type": "text", "text": "?"}]}]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    reference = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image_file}, {"type": "text", "text": "?"}]}],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert torch.equal(out["input_ids"], reference["input_ids"])
    torch.testing.assert_close(out["pixel_values"], reference["pixel_values"])


@pytest.mark.parametrize("form", ["path", "path_key", "array", "frames", "official_in_memory"])
def test_video_content_forms(processor, six_second_video, form):
    frames = VP.load_video(six_second_video).frames
    payload = {
        "path": {"video": six_second_video},
        "path_key": {"path": six_second_video},
        "array": {"video": frames},
        "frames": {"video": [media.photo(56, 84)] * 3},
        "official_in_memory": {"video": list(frames), "num_frames": 6, "timestamps": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]},
    }[form]
    conversation = [{"role": "user", "content": [{"type": "video", **payload}]}]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    stamps = 3 if form == "frames" else 6
    text = decoded(processor, out["input_ids"][0])
    assert text.count("Time ") == stamps and f"Time {stamps - 1}.0s:" in text
    assert (out["input_ids"] == processor.image_token_id).sum() == out["compression_mask"].sum()


def test_per_call_settings(processor, six_second_video):
    conversation = [{"role": "user", "content": [{"type": "video", "video": six_second_video}]}]
    base = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    fewer = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt", max_frames=2)
    faster = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"fps": 2}
    )
    smaller = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt", max_tokens=24, min_tokens=1)
    assert base["grid_sizes"][0, 0] == 6 and fewer["grid_sizes"][0, 0] == 2 and faster["grid_sizes"][0, 0] == 12
    assert smaller["grid_sizes"][0, 1:].prod() < base["grid_sizes"][0, 1:].prod()
    uncompressed = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_tensors="pt", use_token_compression=False
    )
    assert bool(uncompressed["compression_mask"].all())


# ---- batches and masks -------------------------------------------------------------------------------


def batch_of_two(video):
    first = [{"role": "user", "content": [{"type": "image", "image": media.photo(28, 28)}, {"type": "text", "text": "Hi"}]}]
    second = [
        {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "A longer question."}]},
        {"role": "assistant", "content": "Answer."},
        {"role": "user", "content": [{"type": "image", "image": media.photo(56, 28)}, {"type": "text", "text": "More?"}]},
    ]
    return [first, second]


def test_batches_pad_left_by_default_and_keep_item_order(processor, six_second_video):
    out = processor.apply_chat_template(batch_of_two(six_second_video), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["input_ids"].shape[0] == 2 and out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1
    assert out["grid_sizes"][:, 0].tolist() == [1, 6, 1]  # sample 0's image, then sample 1's video and image
    assert out["merge_sizes"].tolist() == [1, 2, 1]
    per_sample = (out["input_ids"] == processor.image_token_id).sum(1)
    assert per_sample[0] == out["grid_sizes"][0].prod() and per_sample.sum() == out["compression_mask"].sum()


def test_padding_side_is_honoured(processor, six_second_video):
    out = processor.apply_chat_template(
        batch_of_two(six_second_video),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "right"},
    )
    assert out["attention_mask"][0, 0] == 1 and out["attention_mask"][0, -1] == 0


def test_assistant_mask_covers_replies_and_im_end(processor, six_second_video):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": media.photo(28, 28)}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A photo."}]},
        {"role": "user", "content": [{"type": "video", "video": six_second_video}]},
        {"role": "assistant", "content": "A square moves."},
    ]
    out = processor.apply_chat_template(
        [conversation, conversation[:2]],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        return_assistant_tokens_mask=True,
        processor_kwargs={"padding": True, "padding_side": "right", "truncation": False, "add_special_tokens": False},
    )
    mask = out["assistant_masks"].bool()
    assert decoded(processor, out["input_ids"][0][mask[0]]) == "A photo.<|im_end|>A square moves.<|im_end|>"
    assert decoded(processor, out["input_ids"][1][mask[1]]) == "A photo.<|im_end|>"


def test_output_is_a_batch_feature_that_casts(processor):
    conversation = [{"role": "user", "content": [{"type": "image", "image": media.photo(28, 28)}]}]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt").to(torch.bfloat16)
    assert out["pixel_values"].dtype == torch.bfloat16 and out["input_ids"].dtype == torch.long
    assert out["compression_mask"].dtype == torch.bool and out["grid_sizes"].dtype == torch.long


def test_decoding(processor):
    ids = processor.tokenizer(["Hello<|im_end|>", "Bye"], padding=True)["input_ids"]
    assert processor.batch_decode(ids, skip_special_tokens=True) == ["Hello", "Bye"]
    assert processor.post_process_image_text_to_text(torch.tensor(ids)) == ["Hello", "Bye"]
    assert processor.post_process_image_text_to_text(torch.tensor(ids[0])) == "Hello"


def test_num_multimodal_tokens_equal_the_placeholders_of_an_item_alone(processor, six_second_video, image_file):
    """What a server (vLLM) asks before processing: tokens of an image, and of a video before DiffFP."""
    image = [{"role": "user", "content": [{"type": "image", "image": image_file}]}]
    video = [{"role": "user", "content": [{"type": "video", "video": six_second_video}]}]
    image_out = processor.apply_chat_template(image, tokenize=True, return_dict=True, return_tensors="pt")
    video_out = processor.apply_chat_template(video, tokenize=True, return_dict=True, return_tensors="pt",
                                              use_token_compression=False)
    t, gh, gw = video_out["grid_sizes"][0].tolist()
    counts = processor._get_num_multimodal_tokens(image_sizes=[(60, 90)], video_sizes=[(t, 14 * gh, 14 * gw)])
    assert counts["num_image_tokens"] == [int((image_out["input_ids"] == processor.image_token_id).sum())]
    assert counts["num_video_tokens"] == [int((video_out["input_ids"] == processor.image_token_id).sum())]
    assert counts["num_image_patches"] == [1]
    small = processor._get_num_multimodal_tokens(video_sizes=[(t, 14 * gh, 14 * gw)], max_tokens=6, min_tokens=1)
    assert small["num_video_tokens"][0] < counts["num_video_tokens"][0]
    with pytest.raises(TypeError, match="unexpected option"):
        processor._get_num_multimodal_tokens(image_sizes=[(60, 90)], max_token=24)


# ---- loading -----------------------------------------------------------------------------------------


def official_checkpoint(folder: Path) -> Path:
    """A folder laid out like an official Hub checkpoint's processor files."""
    tiny_tokenizer().save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(OFFICIAL_PREPROCESSOR_CONFIG))
    (folder / "processor_config.json").write_text(
        json.dumps(
            {
                "auto_map": {"AutoProcessor": "processing_videollama3.Videollama3Qwen2Processor"},
                "fps": 1,
                "image_merge_size": 1,
                "max_frames": 180,
                "processor_class": "Videollama3Qwen2Processor",
                "video_merge_size": 2,
            }
        )
    )
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": OFFICIAL_STYLE_TEMPLATE}))
    for name in ("processing_videollama3.py", "image_processing_videollama3.py", "video_processing_videollama3.py"):
        shutil.copy(REPO_ROOT / name, folder / name)
    return folder


def test_loads_official_files_unchanged(tmp_path, six_second_video):
    processor = AutoProcessor.from_pretrained(str(official_checkpoint(tmp_path)), trust_remote_code=True)
    assert type(processor).__name__ == "Videollama3Qwen2Processor"
    assert (processor.fps, processor.max_frames, processor.video_merge_size) == (1, 180, 2)
    assert processor.image_processor.max_tokens == 16384 and processor.image_processor.min_tokens == 16
    assert processor.chat_template == OFFICIAL_STYLE_TEMPLATE
    prompt = processor.apply_chat_template(multi_turn(six_second_video), add_system_prompt=True, add_generation_prompt=True)
    assert prompt == GOLDEN_MULTI_TURN
    image_processor = AutoImageProcessor.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(image_processor).__name__ == "Videollama3ImageProcessor"


def test_save_load_round_trip(tmp_path, six_second_video):
    processor = tiny_processor(fps=2, max_frames=4, compression_threshold=0.5)
    processor.save_pretrained(str(tmp_path))
    assert "generation" in (tmp_path / "chat_template.jinja").read_text()
    again = AutoProcessor.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert (again.fps, again.max_frames, again.compression_threshold) == (2, 4, 0.5)
    assert again.image_processor.max_tokens == processor.image_processor.max_tokens
    conversation = multi_turn(six_second_video)
    first = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    second = again.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_no_torchvision_needed():
    # The processor, its Auto loading and video decoding run in this venv, which has no torchvision.
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here; the claim is checked in torchvision-free environments")
    assert importlib.util.find_spec("torchvision") is None


# ---- bad input -----------------------------------------------------------------------------------------


def test_unsupported_content_type(processor):
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]
    with pytest.raises(ValueError, match="^message 0 content 0 has unsupported content type 'audio'"):
        processor.apply_chat_template(conversation)


@pytest.mark.parametrize(
    "conversation, message",
    [
        ([{"content": "hi"}], "message 0 must be a dict with a string 'role'"),
        ([{"role": "user", "content": 5}], "message 0 needs 'content' as a string or a list"),
        ([{"role": "user", "content": [5]}], "content 0 must be a dict or a string"),
        (["hello"], "message 0 must be a dict"),
        ([{"role": "user", "content": [{"type": "text"}]}], "text item without a string 'text'"),
        ([{"role": "user", "content": [{"type": "image", "image": {"path": "x"}}]}], "needs a 'image_path' key"),
        ([{"role": "user", "content": [{"type": "video", "video": {"file": "x"}}]}], "needs a 'video_path' key"),
        ([], "non-empty list of messages"),
    ],
)
def test_malformed_message_schema(processor, conversation, message):
    with pytest.raises(ValueError, match=message):
        processor.apply_chat_template(conversation, tokenize=True)


def test_image_item_without_image(processor):
    with pytest.raises(ValueError, match="content 0: the image item has no image"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=True)


def test_placeholder_count_mismatch_in_text_call(processor):
    with pytest.raises(ValueError, match="1 <image> markers in total but 2 images"):
        processor(text="<image> hi", images=[media.photo(28, 28), media.photo(28, 28)])
    with pytest.raises(ValueError, match="1 <video> markers in total but 0 videos"):
        processor(text="<video> hi")


def test_truncation_that_cuts_placeholders_is_an_error(processor):
    with pytest.raises(ValueError, match="truncation cut visual placeholders"):
        processor(text="<image> describe", images=[media.photo(56, 56)], truncation=True, max_length=5)


def test_conversation_and_text_together(processor):
    with pytest.raises(ValueError, match="either conversation or text"):
        processor(text="hi", conversation=[{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("key, value, message", [("fps", 0, "fps must be a number > 0"), ("max_frames", 0, "max_frames must be an integer > 0")])
def test_bad_per_call_settings(processor, key, value, message):
    with pytest.raises(ValueError, match=message):
        processor(text="hi", **{key: value})


def test_more_images_than_image_items_is_an_error(processor):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    two = [media.photo(28, 28), media.photo(28, 28)]
    with pytest.raises(ValueError, match=r"has 1 image items without an image but 2 images were given"):
        processor.apply_chat_template(conversation, tokenize=True, processor_kwargs={"images": two})
    batch = [conversation, conversation]
    with pytest.raises(ValueError, match=r"^conversation 1 the conversation has 1 image items .* but 2 images"):
        processor.apply_chat_template(batch, tokenize=True, processor_kwargs={"images": [two[:1], two]})


@pytest.mark.parametrize("call", ["conversation", "text", "chat"])
def test_unknown_options_are_type_errors_on_every_call_path(processor, call):
    conversation = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match="max_frame"):
        if call == "conversation":
            processor(conversation=conversation, max_frame=2)
        elif call == "text":
            processor(text="hi", max_frame=2)
        else:
            processor.apply_chat_template(conversation, tokenize=True, max_frame=2)
    with pytest.raises(TypeError, match=r"videos_kwargs\['fsp'\]"):
        processor(text="hi", videos_kwargs={"fsp": 2})


def test_template_variables_still_reach_the_template(processor):
    template = "{% for m in messages %}{{ greeting }} {{ m['content'] }}{% endfor %}"
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, greeting="Hey") == "Hey hi"
    # generation settings a pipeline passes along are no template variables and no typos: ignored as in transformers
    assert processor.apply_chat_template([{"role": "user", "content": "hi"}], do_sample=False).startswith("<|im_start|>user")


def test_unknown_roles_are_refused_with_the_allowed_list(processor):
    with pytest.raises(ValueError, match=r"message 0 has role 'usr'; the chat template knows \['system', 'user', 'assistant', 'stream'\]"):
        processor.apply_chat_template([{"role": "usr", "content": "hi"}])
    official = processor.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=OFFICIAL_STYLE_TEMPLATE)
    assert official.startswith("<|im_start|>user")
    with pytest.raises(ValueError, match=r"knows \['system', 'user', 'assistant'\]$"):
        processor.apply_chat_template([{"role": "stream", "content": "hi"}], chat_template=OFFICIAL_STYLE_TEMPLATE)


def test_trl_collator_assistant_only_loss(processor):
    trl = pytest.importorskip("trl.trainer.sft_trainer")
    collator = trl.DataCollatorForVisionLanguageModeling(processor=processor, assistant_only_loss=True, max_length=None)
    example = {
        "images": [media.photo(28, 28)],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A photo."}]},
        ],
    }
    batch = collator([example, example])
    labels = batch["labels"][0]
    assert decoded(processor, labels[labels != -100]) == "A photo.<|im_end|>"
    assert {"pixel_values", "grid_sizes", "merge_sizes", "compression_mask"} <= set(batch)


# ---- the model's contract: placeholders == features ---------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(processor):
    from tools.tiny import tiny_config

    model_module = remote_module("modeling_videollama3")
    torch.manual_seed(0)
    return model_module.Videollama3Qwen2ForCausalLM(tiny_config(processor.tokenizer)).eval()


def contract_cases(video, image_file):
    image = {"type": "image", "image": image_file}
    clip = {"type": "video", "video": video}
    frames = {"type": "video", "video": static_frames(4)}
    text = {"type": "text", "text": "Describe."}
    return {
        "image": [[{"role": "user", "content": [image, text]}]],
        "video": [[{"role": "user", "content": [clip, text]}]],
        "static_frames": [[{"role": "user", "content": [frames, text]}]],
        "image_and_video": [[{"role": "user", "content": [image, clip, frames, text]}]],
        "multi_turn": [multi_turn(video)],
        "batch": batch_of_two(video),
        "text_only": [[{"role": "user", "content": "Hello"}]],
    }


@pytest.mark.parametrize("case", ["image", "video", "static_frames", "image_and_video", "multi_turn", "batch", "text_only"])
def test_placeholders_equal_model_features(processor, tiny_model, six_second_video, image_file, case):
    conversations = contract_cases(six_second_video, image_file)[case]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    if "compression_mask" in inputs:
        assert (inputs["input_ids"] == processor.image_token_id).sum() == inputs["compression_mask"].sum()
    with torch.no_grad():
        logits = tiny_model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape


def test_model_rejects_a_placeholder_mismatch(processor, tiny_model, image_file):
    conversation = [{"role": "user", "content": [{"type": "image", "image": image_file}]}]
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    position = (inputs["input_ids"][0] == processor.image_token_id).nonzero()[0, 0]
    inputs["input_ids"][0, position] = processor.tokenizer.convert_tokens_to_ids("a")
    with pytest.raises(ValueError):
        tiny_model(**inputs)


def test_image_text_to_text_pipeline(processor, tiny_model, tmp_path, six_second_video):
    from transformers import pipeline

    tiny_model.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    for name in ("configuration_videollama3.py", "modeling_videollama3.py"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)  # what a checkpoint folder carries
    pipe = pipeline("image-text-to-text", model=str(tmp_path), trust_remote_code=True)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": media.photo(28, 28)},
                {"type": "video", "video": six_second_video},
                {"type": "text", "text": "Hi"},
            ],
        }
    ]
    reply = pipe(text=messages, max_new_tokens=2, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
