"""Hugging Face Inference Endpoint handler: how the Hub serves a `trust_remote_code` model.

The endpoint toolkit builds `EndpointHandler(path)` once and calls it with each request's JSON:
`{"inputs": <chat messages or a prompt string>, "parameters": {...}}`. Images and videos in the messages are
URLs, paths or base64 (`{"type": "image", "base64": ...}` or a `data:...;base64,` string). Parameters are
generation settings plus the processor's per-call options (`fps`, `max_frames`, ...). The answer follows the
Hub's image-text-to-text schema, `[{"generated_text": ...}]`; bad input answers `{"error": ...}`.
"""

import base64
import binascii

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

GENERATION_KEYS = {"max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams"}


def _media_bytes(item) -> dict:
    """A content item with any base64 image or video payload decoded to bytes, which the processor reads like a file."""
    kind = item.get("type") if isinstance(item, dict) else None
    if kind not in ("image", "video"):
        return item
    payload = item.get("base64", item.get(kind))
    if isinstance(payload, str) and ("base64" in item or payload.startswith("data:")):
        try:
            decoded = base64.b64decode(payload.split(",", 1)[-1], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"the {kind} item's base64 payload does not decode") from None
        return {**{k: v for k, v in item.items() if k != "base64"}, kind: decoded}  # keeps fps, start_time, ...
    return item


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        # device_map: the endpoint's GPU(s) when it has them, else the CPU.
        self.model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype="auto",
                                                          device_map="auto").eval()

    def __call__(self, data: dict):
        try:
            return self.generate(data)
        except (ValueError, TypeError, OSError) as error:
            return {"error": f"{type(error).__name__}: {error}"}

    def generate(self, data: dict) -> list[dict]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError("the request must be a JSON object with 'inputs' (chat messages or a prompt)")
        messages, parameters = data["inputs"], dict(data.get("parameters") or {})
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"'inputs' must be a list of chat messages or a string, got {type(messages).__name__}")
        messages = [dict(m, content=[_media_bytes(item) for item in m["content"]]) if isinstance(m.get("content"), list)
                    else m for m in messages]
        generation = {k: parameters.pop(k) for k in list(parameters) if k in GENERATION_KEYS}
        inputs = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt", processor_kwargs=parameters)
        with torch.no_grad():
            out = self.model.generate(**inputs.to(self.model.device), **{"max_new_tokens": 256, **generation})
        new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (1, generated)
        return [{"generated_text": self.processor.batch_decode(new_tokens, skip_special_tokens=True)[0]}]
