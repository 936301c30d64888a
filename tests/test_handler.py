"""The Inference Endpoint handler, called the way the endpoint toolkit calls it, on the embedded model."""

import base64

import pytest

from tools.local import REPO_ROOT

MEDIA = REPO_ROOT / "examples" / "media"


@pytest.fixture(scope="module")
def endpoint():
    from handler import EndpointHandler

    return EndpointHandler(str(REPO_ROOT / "tiny_model"))


def ask(endpoint, content, **parameters):
    return endpoint({"inputs": [{"role": "user", "content": content}], "parameters": {"max_new_tokens": 8, **parameters}})


def test_image_by_path_and_by_base64_give_the_same_answer(endpoint):
    question = {"type": "text", "text": "What colour is the circle?"}
    by_path = ask(endpoint, [{"type": "image", "image": str(MEDIA / "shapes.png")}, question])
    encoded = base64.b64encode((MEDIA / "shapes.png").read_bytes()).decode()
    by_base64 = ask(endpoint, [{"type": "image", "base64": encoded}, question])
    by_data_uri = ask(endpoint, [{"type": "image", "image": f"data:image/png;base64,{encoded}"}, question])
    assert by_path == by_base64 == by_data_uri == [{"generated_text": "red"}]  # the bundled question's answer


def test_video_with_processor_parameters(endpoint):
    question = {"type": "text", "text": "What appears in the video?"}
    answer = ask(endpoint, [{"type": "video", "video": str(MEDIA / "shapes.mp4")}, question], fps=1, max_frames=180)
    assert answer == [{"generated_text": "a green square"}]
    assert isinstance(ask(endpoint, [{"type": "video", "video": str(MEDIA / "shapes.mp4")}, question], max_frames=2)[0]
                      ["generated_text"], str)


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
    assert set(endpoint({"inputs": "Hello", "parameters": {"max_new_tokens": 2}})[0]) == {"generated_text"}
