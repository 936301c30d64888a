"""The Inference Endpoint handler, called the way the endpoint toolkit calls it, on the embedded model."""

import base64
from pathlib import Path

import pytest
import torch

from examples.demo import bundled_examples
from tools.local import REPO_ROOT

# The bundled media with their questions and ground-truth answers (examples/media/examples.json).
EXAMPLES = {kind: (entry[kind], dict(zip(entry["questions"], entry["answers"])))
            for entry in bundled_examples() for kind in ("image", "video") if kind in entry}


@pytest.fixture(scope="module")
def endpoint():
    from handler import EndpointHandler

    return EndpointHandler(str(REPO_ROOT / "tiny_model"))


@pytest.fixture
def processed(endpoint, monkeypatch):
    """What the handler's processor call returned, one entry per request, in order."""
    outputs = []
    apply_chat_template = endpoint.processor.apply_chat_template

    def spy(*args, **kwargs):
        outputs.append(apply_chat_template(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(endpoint.processor, "apply_chat_template", spy)
    return outputs


def ask(endpoint, content, **parameters):
    return endpoint({"inputs": [{"role": "user", "content": content}], "parameters": {"max_new_tokens": 8, **parameters}})


def text(answer):
    """The generated text of a successful answer, `[{"generated_text": str}]`."""
    assert isinstance(answer, list) and len(answer) == 1 and set(answer[0]) == {"generated_text"}, answer
    assert isinstance(answer[0]["generated_text"], str)
    return answer[0]["generated_text"]


def encoded(path):
    return base64.b64encode(Path(path).read_bytes()).decode()


def frames(inputs):
    """Frames of the request's one video (the time axis of its grid)."""
    return int(inputs["grid_sizes"][0, 0])


def visual_tokens(endpoint, inputs):
    return int((inputs["input_ids"] == endpoint.processor.image_token_id).sum())


def test_image_by_path_and_by_base64_give_the_bundled_answer(endpoint):
    image, answers = EXAMPLES["image"]
    question = "What colour is the circle?"
    by_path = ask(endpoint, [{"type": "image", "image": image}, {"type": "text", "text": question}])
    by_base64 = ask(endpoint, [{"type": "image", "base64": encoded(image)}, {"type": "text", "text": question}])
    by_data_uri = ask(endpoint, [{"type": "image", "image": f"data:image/png;base64,{encoded(image)}"},
                                 {"type": "text", "text": question}])
    assert by_path == by_base64 == by_data_uri == [{"generated_text": answers[question]}]


def test_video_processor_parameters_reach_the_processor(endpoint, processed):
    """`fps` and `max_frames` in the request's parameters change the frames the processor samples
    (the defaults, fps 1 and at most 180 frames, give one frame per second of the clip)."""
    video, answers = EXAMPLES["video"]
    question = "What appears in the video?"
    content = [{"type": "video", "video": video}, {"type": "text", "text": question}]
    assert (endpoint.processor.fps, endpoint.processor.max_frames) == (1, 180)
    assert ask(endpoint, content) == [{"generated_text": answers[question]}]
    default = processed[-1]
    assert frames(default) > 2

    text(ask(endpoint, content, max_frames=2))
    two = processed[-1]
    assert frames(two) == 2
    assert two["input_ids"].shape[1] < default["input_ids"].shape[1]
    assert visual_tokens(endpoint, two) < visual_tokens(endpoint, default)

    text(ask(endpoint, content, fps=2))
    assert frames(processed[-1]) == 2 * frames(default)


@pytest.mark.parametrize("settings", [{"max_frames": 2}, {"start_time": 1.0, "end_time": 4.0}],
                         ids=["max_frames", "start_end"])
def test_a_base64_video_keeps_its_item_settings(endpoint, processed, settings):
    """A base64 video item's other keys reach the processor as they do for the same video by path."""
    video, _ = EXAMPLES["video"]
    question = {"type": "text", "text": "What appears in the video?"}
    text(ask(endpoint, [{"type": "video", "video": video}, question]))
    by_base64 = ask(endpoint, [{"type": "video", "base64": encoded(video), **settings}, question])
    by_path = ask(endpoint, [{"type": "video", "video": video, **settings}, question])
    assert text(by_base64) == text(by_path)
    unset, base64_inputs, path_inputs = processed
    assert base64_inputs.keys() == path_inputs.keys()
    for key in path_inputs:
        assert torch.equal(base64_inputs[key], path_inputs[key]), key
    assert frames(path_inputs) < frames(unset)  # the settings took effect


@pytest.mark.parametrize("data, message", [
    ({"prompt": "hi"}, "must be a JSON object with 'inputs'"),
    ({"inputs": 5}, "'inputs' must be a list of chat messages or a string"),
    ({"inputs": [{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}]}]}, "not found"),
    ({"inputs": [{"role": "user", "content": [{"type": "image", "base64": "%%%"}]}]}, "base64 payload does not decode"),
    ({"inputs": "hi", "parameters": {"max_frame": 2}}, "unexpected option"),
])
def test_bad_requests_answer_an_error_payload(endpoint, data, message):
    answer = endpoint(data)
    assert set(answer) == {"error"} and message in answer["error"] and "Traceback" not in answer["error"]


def test_a_plain_prompt(endpoint):
    text(endpoint({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}))
