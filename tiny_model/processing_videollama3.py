"""VideoLLaMA3 processor: conversations and text in, the model's data contract out.

Output of every call (`BatchFeature`): `input_ids (B, L)` and `attention_mask (B, L)` (left-padded by
default) and, when there is visual input, over the batch in prompt order: `pixel_values (N, D)`,
`grid_sizes (k, 3)` `[T, gh, gw]`, `merge_sizes (k,)`, `compression_mask (M,)` (True = keep).
Every `<image>` stands for one image or one video frame and is repeated by that frame's kept merged
tokens, so DiffFP needs no token deletion in the model and batches work.
"""

import bisect
import difflib
import json
import os
import re
from typing import TypedDict

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, TextKwargs
from transformers.utils.chat_template_utils import render_jinja_template

from .image_processing_videollama3 import Videollama3ImageProcessor, merged_tokens
from .video_processing_videollama3 import Videollama3VideoProcessor, as_video_list

SYSTEM_PROMPT = (
    "You are VideoLLaMA3 created by Alibaba DAMO Academy, a helpful assistant to help people understand images "
    "and videos."
)

# Renders exactly what the official template renders (facts section 7), plus `{% generation %}`
# markers around each assistant reply and its `<|im_end|>` so that assistant-only loss works.
# It reads the same variables: `add_system_prompt`, `image_token`, and per content item
# `num_frames` / `timestamps` (videos) and `timestamp` (images), which the processor fills in.
CHAT_TEMPLATE = r"""
{%- set image_token = image_token | default('<image>') -%}
{%- set default_system_prompt = '""" + SYSTEM_PROMPT + r"""' -%}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item is string -%}
                {{- item -}}
            {%- elif item['type'] == 'text' or 'text' in item -%}
                {{- item['text'] -}}
            {%- elif item['type'] == 'image' or 'image' in item -%}
                {%- if 'timestamp' in item -%}
                    {{- 'Time ' + item['timestamp'] | round(1) | string + 's: ' -}}
                {%- endif -%}
                {{- image_token + '\n' -}}
            {%- elif item['type'] == 'video' or 'video' in item -%}
                {%- for i in range(item['num_frames']) -%}
                    {%- if 'timestamps' in item -%}
                        {{- 'Time ' + item['timestamps'][i] | round(1) | string + 's:' -}}
                    {%- endif -%}
                    {{- image_token + ('\n' if loop.last else ',') -}}
                {%- endfor -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
    {%- if loop.first and add_system_prompt and message['role'] != 'system' -%}
        {{- '<|im_start|>system\n' + default_system_prompt + '<|im_end|>\n' -}}
    {%- endif -%}
    {%- set tag = 'stream' if message['role'] == 'stream' else 'im' -%}
    {{- '<|' + tag + '_start|>' + message['role'] + '\n' -}}
    {%- if message['role'] == 'assistant' -%}
        {%- generation -%}
            {{- render_content(message['content']) + '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- elif tag == 'stream' and message['content'] is not string -%}
        {{- render_content(message['content']) + '<|stream_end|>' -}}
    {%- else -%}
        {{- render_content(message['content']) + '<|' + tag + '_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

VIDEO_MARKER = "<video>"
VIDEO_ITEM_KEYS = ("fps", "max_frames", "start_time", "end_time", "timestamps")


class Videollama3ImagesKwargs(TypedDict, total=False):
    min_tokens: int
    max_tokens: int
    image_merge_size: int


class Videollama3VideosKwargs(TypedDict, total=False):
    fps: int | float
    max_frames: int
    video_merge_size: int
    use_token_compression: bool
    compression_threshold: int | float
    compression_min_tokens: int


class Videollama3ProcessorKwargs(ProcessingKwargs, total=False):
    """Per-call options: tokenizer options, the token budget (`min_tokens`, `max_tokens`, shared by a
    sample's images and frames), merge sizes, video sampling and DiffFP."""

    images_kwargs: Videollama3ImagesKwargs
    videos_kwargs: Videollama3VideosKwargs


OPTION_KEYS = {
    name: set(typed.__annotations__) - {"return_tensors"}
    for name, typed in (("text_kwargs", TextKwargs), ("images_kwargs", Videollama3ImagesKwargs),
                        ("videos_kwargs", Videollama3VideosKwargs))
}


def _where(batched: bool, sample: int, text: str) -> str:
    return f"conversation {sample} {text}" if batched else text


class Videollama3Qwen2Processor(ProcessorMixin):
    r"""Processor of VideoLLaMA3: any-resolution images, PyAV video sampling, DiffFP, the official chat template.

    Args:
        image_processor: a `Videollama3ImageProcessor` (its pixel settings are the video processor's too).
        tokenizer: the Qwen2 tokenizer with the `<image>` token.
        chat_template: defaults to the official template with generation markers.
        fps, max_frames, use_token_compression, compression_threshold, compression_min_tokens: video
            sampling and DiffFP defaults (official processor_config.json keys); None = the video processor's.
        image_merge_size, video_merge_size: merge sizes of images and videos.

    Calls: the official `processor(conversation=..., add_system_prompt=..., add_generation_prompt=...)`,
    `processor(text=..., images=..., videos=...)` (`<image>` / `<video>` markers) and
    `processor.apply_chat_template(messages, tokenize=True, return_dict=True)`. Each takes the options
    of `Videollama3ProcessorKwargs` for that call; any other keyword is a TypeError.
    """

    # The video processor is built here, not a constructor attribute: a `video_processor` attribute is
    # loaded through AutoVideoProcessor, which requires torchvision.
    _auto_class = "AutoProcessor"
    text_kwargs = {"padding": True, "padding_side": "left", "add_special_tokens": False}
    images_kwargs = {"image_merge_size": 1}
    videos_kwargs = {"video_merge_size": 2}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, fps=None, max_frames=None,
                 image_merge_size=1, video_merge_size=2, use_token_compression=None, compression_threshold=None,
                 compression_min_tokens=None, image_token="<image>"):
        image_processor = image_processor or Videollama3ImageProcessor()
        if tokenizer is None:
            raise ValueError("Videollama3Qwen2Processor needs a tokenizer")
        video_settings = {"fps": fps, "max_frames": max_frames, "use_token_compression": use_token_compression,
                          "compression_threshold": compression_threshold, "compression_min_tokens": compression_min_tokens}
        self.video_processor = Videollama3VideoProcessor(
            **image_processor.pixel_settings(), **{k: v for k, v in video_settings.items() if v is not None})
        for key in video_settings:  # saved in processor_config.json as the official processor does
            setattr(self, key, getattr(self.video_processor, key))
        self.image_merge_size, self.video_merge_size, self.image_token = image_merge_size, video_merge_size, image_token
        self.images_kwargs = {"image_merge_size": image_merge_size}
        self.videos_kwargs = {"video_merge_size": video_merge_size, **{k: getattr(self, k) for k in video_settings}}
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token")

    # ---- options -------------------------------------------------------------------------------------

    def _options(self, kwargs: dict, where: str) -> dict:
        """Merge per-call options over this processor's; unknown names are a TypeError."""
        unknown = sorted(k for k in kwargs if k not in OPTION_KEYS and not any(k in keys for keys in OPTION_KEYS.values()))
        unknown += sorted(f"{group}[{k!r}]" for group in OPTION_KEYS for k in kwargs.get(group) or {} if k not in OPTION_KEYS[group])
        if unknown:
            allowed = sorted(set().union(*OPTION_KEYS.values()) - OPTION_KEYS["text_kwargs"]) + ["tokenizer options"]
            raise TypeError(f"{where} got unexpected option(s) {unknown}; options are {allowed}")
        options = self._merge_kwargs(Videollama3ProcessorKwargs, **kwargs)
        images, videos = options["images_kwargs"], options["videos_kwargs"]
        for key, value in (("max_frames", videos["max_frames"]), ("image_merge_size", images["image_merge_size"]),
                           ("video_merge_size", videos["video_merge_size"])):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be an integer > 0, got {value!r}")
        if not videos["fps"] > 0:
            raise ValueError(f"fps must be a number > 0, got {videos['fps']!r}")
        if videos["compression_min_tokens"] < 0:
            raise ValueError(f"compression_min_tokens must be an integer >= 0, got {videos['compression_min_tokens']!r}")
        return options

    # ---- media ---------------------------------------------------------------------------------------

    def _load(self, kind: str, payload, item: dict, options: dict, where: str) -> tuple:
        """`(kind, pixels)`: an image as `(H, W, 3)` uint8, a video as the video processor's sampled video."""
        key = f"{kind}_path"
        if isinstance(payload, dict):
            if key not in payload:
                raise ValueError(f"{where}: the {kind} dict needs a {key!r} key, got keys {sorted(payload)}")
            item, payload = {**item, **payload}, payload[key]
        if payload is None:
            raise ValueError(f"{where}: the {kind} item has no {kind} (give '{kind}', 'path' or 'url')")
        try:
            if kind == "image":
                return kind, self.image_processor.fetch_images(payload)
            videos = options["videos_kwargs"]
            settings = {k: item.get(k, videos.get(k)) for k in VIDEO_ITEM_KEYS}
            return kind, self.video_processor.fetch_videos(payload, **settings)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where}: {error}") from None

    def _pixels(self, visuals: list, options: dict) -> tuple[BatchFeature, list]:
        """One sample's visual inputs (one token budget for all its items) and each `<image>`'s token count."""
        images, videos = options["images_kwargs"], options["videos_kwargs"]
        merges = [images["image_merge_size"] if kind == "image" else videos["video_merge_size"] for kind, _ in visuals]
        shapes = [(1, *media.shape[:2]) if kind == "image" else media.shape for kind, media in visuals]
        sizes = self.image_processor.target_sizes(shapes, merges, images.get("min_tokens"), images.get("max_tokens"))
        parts, counts = [], []
        for (kind, media), size, m in zip(visuals, sizes, merges):
            if kind == "image":
                part = self.image_processor(media, merge_size=m, sizes=[size], return_tensors="pt")
            else:
                part = self.video_processor(media, merge_size=m, sizes=[size], return_tensors="pt",
                                            use_token_compression=videos["use_token_compression"],
                                            compression_threshold=videos["compression_threshold"],
                                            compression_min_tokens=videos["compression_min_tokens"])
            counts += part["compression_mask"].view(int(part["grid_sizes"][0, 0]), -1).sum(1).tolist()  # (T,)
            parts.append(part)
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}, counts

    # ---- encoding ------------------------------------------------------------------------------------

    def _encode(self, prompts, visuals_per_sample, options, return_tensors, generation_spans=None) -> BatchFeature:
        token, features, expanded, shifts = self.image_token, [], [], []
        for index, (prompt, visuals) in enumerate(zip(prompts, visuals_per_sample)):
            needed, found = sum(1 if kind == "image" else media.shape[0] for kind, media in visuals), prompt.count(token)
            if found != needed:
                raise ValueError(f"sample {index}: the text has {found} {token} placeholders but its images and video "
                                 f"frames need {needed} (one per image and one per video frame)")
            parts, sample_shifts = prompt.split(token), []
            if visuals:
                sample, counts = self._pixels(visuals, options)
                features.append(sample)
                pieces, position = [parts[0]], len(parts[0])
                for count, part in zip(counts, parts[1:]):
                    pieces += [token * count, part]
                    # (end of this placeholder in the rendered prompt, characters its expansion added)
                    sample_shifts.append((position + len(token), len(token) * (count - 1)))
                    position += len(token) + len(part)
                prompt = "".join(pieces)
            expanded.append(prompt)
            shifts.append(sample_shifts)
        text_options = dict(options["text_kwargs"])
        text_options.pop("return_tensors", None)
        encoding = self.tokenizer(expanded, return_offsets_mapping=generation_spans is not None, **text_options)
        expected = [text.count(token) for text in expanded]
        found = [list(ids).count(self.image_token_id) for ids in encoding["input_ids"]]
        if expected != found:
            raise ValueError(f"truncation cut visual placeholders: per sample the prompt needs {expected} {token} tokens "
                             f"but input_ids keep {found}; raise max_length or lower max_tokens/max_frames")
        data = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
        if generation_spans is not None:
            data["assistant_masks"] = _assistant_masks(encoding["offset_mapping"], generation_spans, shifts)
        for key in features[0] if features else ():
            data[key] = torch.cat([f[key] for f in features])  # pixel_values (N, D), grid_sizes (k, 3), ... (M,)
        return BatchFeature(data=data, tensor_type=return_tensors)

    # ---- public API ----------------------------------------------------------------------------------

    def __call__(self, text=None, images=None, videos=None, conversation=None, add_system_prompt=False,
                 add_generation_prompt=False, return_tensors=None, **kwargs) -> BatchFeature:
        """Encode a conversation (official call), or prompts whose `<image>` markers take `images` and
        whose `<video>` markers take `videos` (each becomes `Time 0.0s:<image>,Time 1.0s:<image>,...`).

        `images` / `videos`: flat in prompt order, or (images) one list per prompt.
        """
        if conversation is not None:
            if text is not None or images is not None or videos is not None:
                raise ValueError("pass either conversation or text/images/videos, not both")
            return self.apply_chat_template(conversation, add_system_prompt=add_system_prompt, tokenize=True,
                                            add_generation_prompt=add_generation_prompt, return_dict=True,
                                            return_tensors=return_tensors, processor_kwargs=kwargs)
        options = self._options(kwargs, "processor(text=...)")
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"text must be a string or a list of strings (prompts with <image>/<video> markers), got {type(text).__name__}")
        per_image = _distribute(images, text, self.image_token, "images")
        per_video = _distribute(videos, text, VIDEO_MARKER, "videos")
        prompts, visuals_per_sample = [], []
        for index, prompt in enumerate(text):
            pieces, visuals, out = re.split(f"({re.escape(self.image_token)}|{re.escape(VIDEO_MARKER)})", prompt), [], []
            images_left, videos_left = iter(per_image[index]), iter(per_video[index])
            for piece in pieces:
                if piece in (self.image_token, VIDEO_MARKER):
                    kind = "image" if piece == self.image_token else "video"
                    payload = next(images_left if kind == "image" else videos_left)
                    visuals.append(self._load(kind, payload, {}, options, f"sample {index} {kind} {len(visuals)}"))
                    if kind == "video":
                        piece = ",".join(f"Time {_stamp(t)}s:{self.image_token}" for t in visuals[-1][1].timestamps)
                out.append(piece)
            prompts.append("".join(out))
            visuals_per_sample.append(visuals)
        return self._encode(prompts, visuals_per_sample, options, return_tensors)

    # Overrides the base: the official prompt prints each video's sampled frame times, so videos are
    # sampled before the template renders, and images and videos must stay in their prompt order.
    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt=False, add_system_prompt=False,
                            continue_final_message=False, return_assistant_tokens_mask=False, tokenize=False,
                            return_dict=False, return_tensors=None, processor_kwargs=None, tools=None, documents=None,
                            **kwargs):
        """Render conversations with the chat template and, with `tokenize=True`, encode them.

        Content items (official and HF forms): `{"type": "text", "text": str}`;
        `{"type": "image", "image": path | URL | PIL | array | {"image_path": path}}` (or `"path"`/`"url"`,
        or no payload: the next of `processor_kwargs["images"]`); `{"type": "video", "video": path | URL |
        bytes | (T, H, W, 3) array | [frames] | {"video_path", "fps", "max_frames", "start_time", "end_time"}}`
        with optional item-level `fps`, `max_frames`, `start_time`, `end_time`, and `timestamps` for
        in-memory frames. Options go in `processor_kwargs` (or loose); other keywords are template
        variables and must appear in the template.
        """
        processor_kwargs = dict(processor_kwargs or {})
        spare = processor_kwargs.pop("images", None)
        return_tensors = processor_kwargs.pop("return_tensors", return_tensors)
        template = self._template(chat_template)
        options_given = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_KEYS or any(k in v for v in OPTION_KEYS.values())}
        # Other keywords are template variables (pipelines pass generation settings here too); one the
        # template does not use but that is spelt like an option is a typo.
        names = set().union(*OPTION_KEYS.values())
        typos = {k: difflib.get_close_matches(k, names, 1) for k in kwargs if not re.search(rf"\b{re.escape(k)}\b", template)}
        if any(typos.values()):
            raise TypeError("apply_chat_template got unexpected keyword argument(s) "
                            + ", ".join(f"{k!r} (did you mean {m[0]!r}?)" for k, m in typos.items() if m))
        options = self._options({**options_given, **processor_kwargs}, "apply_chat_template")
        conversation = getattr(conversation, "messages", conversation)  # the pipelines' Chat objects
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = [getattr(c, "messages", c) for c in conversation] if batched else [conversation]
        spare = _per_sample(spare, len(conversations))
        rendered, visuals_per_sample = [], []
        for sample, messages in enumerate(conversations):
            given = len(spare[sample])
            copy, visuals = self._prepare(messages, sample, batched, options, tokenize, spare[sample], template)
            if spare[sample]:
                raise ValueError(f"{_where(batched, sample, 'the conversation')} has {given - len(spare[sample])} image "
                                 f"items without an image but {given} images were given in processor_kwargs['images']")
            rendered.append(copy)
            visuals_per_sample.append(visuals)
        prompts, generation_spans = render_jinja_template(
            conversations=rendered, tools=tools, documents=documents, chat_template=template,
            return_assistant_tokens_mask=return_assistant_tokens_mask, continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt, add_system_prompt=add_system_prompt,
            **{**self.tokenizer.special_tokens_map, "image_token": self.image_token, **kwargs})
        if not tokenize:
            return prompts if batched else prompts[0]
        out = self._encode(prompts, visuals_per_sample, options, return_tensors,
                           generation_spans if return_assistant_tokens_mask else None)
        return out if return_dict else out["input_ids"]

    def _template(self, chat_template):
        """`chat_template` (a template, or the name of one of several), else the processor's."""
        templates = self.chat_template
        if isinstance(templates, dict) and chat_template in templates:
            return templates[chat_template]
        template = chat_template or (templates.get("default") if isinstance(templates, dict) else templates)
        if not template:
            raise ValueError("no chat template: pass chat_template or load a processor that has one")
        return template

    def _prepare(self, messages, sample, batched, options, load, spare_images, template):
        """A checked copy of one conversation for the template, and its visual items in prompt order."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"{_where(batched, sample, 'conversation')} must be a non-empty list of messages, "
                             f"got {type(messages).__name__}")
        roles = ["system", "user", "assistant"] + (["stream"] if "stream" in template else [])
        copy, visuals = [], []
        for m_index, message in enumerate(messages):
            where = _where(batched, sample, f"message {m_index}")
            if not isinstance(message, dict):
                raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
            if not isinstance(message.get("role"), str):
                raise ValueError(f"{where} needs a string 'role', got keys {sorted(message)}")
            if message["role"] not in roles:
                raise ValueError(f"{where} has role {message['role']!r}; the chat template knows {roles}")
            content = message.get("content")
            message = {k: v for k, v in message.items() if v is not None}
            if isinstance(content, str):
                copy.append(message)
                continue
            if not isinstance(content, (list, tuple)):
                raise ValueError(f"{where} needs 'content' as a string or a list of items, got {type(content).__name__}")
            items = []
            for c_index, item in enumerate(content):
                item_where = f"{where} content {c_index}"
                if isinstance(item, str):
                    items.append(item)
                    continue
                if not isinstance(item, dict):
                    raise ValueError(f"{item_where} must be a dict or a string, got {type(item).__name__}")
                item = {k: v for k, v in item.items() if v is not None}  # Arrow fills absent keys with None
                kind = item.get("type") or next((k for k in ("text", "image", "video") if k in item), None)
                if kind == "image_url":
                    url = item.get("image_url")
                    item, kind = {"type": "image", "url": url.get("url") if isinstance(url, dict) else url}, "image"
                if kind == "text":
                    if not isinstance(item.get("text"), str):
                        raise ValueError(f"{item_where} is a text item without a string 'text'")
                    items.append({"type": "text", "text": item["text"]})
                elif kind in ("image", "video"):
                    payload = item.get(kind, item.get("path", item.get("url")))
                    if kind == "image" and payload is None and spare_images:
                        payload = spare_images.pop(0)
                    entry = {"type": kind, kind: "image"}
                    if kind == "video" or load:
                        visuals.append(self._load(kind, payload, item, options, item_where))
                    if kind == "video":
                        entry.update(num_frames=visuals[-1][1].shape[0], timestamps=visuals[-1][1].timestamps)
                    elif "timestamp" in item:
                        entry["timestamp"] = float(item["timestamp"])
                    items.append(entry)
                else:
                    raise ValueError(f"{item_where} has unsupported content type {item.get('type')!r}; "
                                     "expected 'text', 'image' or 'video'")
            copy.append({**message, "content": items})
        return copy, visuals

    def num_visual_tokens(self, conversation=None, images=None, videos=None, prune=True, **kwargs) -> list:
        """Placeholder tokens each visual item will cost, in prompt order (one list per conversation of a batch).

        With `prune=True` counts are after DiffFP (videos are decoded); `prune=False` gives the count
        before pruning from the container's metadata alone.
        """
        options = self._options(kwargs, "num_visual_tokens")
        if conversation is not None:
            batched = isinstance(conversation[0], (list, tuple))
            conversations = conversation if batched else [conversation]
            template = self._template(None)
            samples = [self._prepare(m, i, batched, options, True, [], template)[1] for i, m in enumerate(conversations)]
        else:
            batched, image_list = False, images if isinstance(images, (list, tuple)) else [images] * (images is not None)
            samples = [[self._load("image", x, {}, options, f"image {i}") for i, x in enumerate(image_list)]
                       + [self._load("video", x, {}, options, f"video {i}") for i, x in enumerate(as_video_list(videos))]]
        results = []
        for visuals in samples:
            if visuals and (prune and options["videos_kwargs"]["use_token_compression"]):
                _, counts = self._pixels(visuals, options)
                sizes = [1 if kind == "image" else media.shape[0] for kind, media in visuals]
                results.append([sum(counts[a:b]) for a, b in zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes))])
            elif visuals:
                results.append(self._unpruned([(1, *m.shape[:2]) if k == "image" else m.shape for k, m in visuals],
                                              [k == "video" for k, _ in visuals], options))
            else:
                results.append([])
        return results if batched else results[0]

    def _unpruned(self, shapes, is_video, options) -> list[int]:
        images, videos = options["images_kwargs"], options["videos_kwargs"]
        merges = [videos["video_merge_size"] if v else images["image_merge_size"] for v in is_video]
        return self.image_processor.num_tokens(shapes, merges, images.get("min_tokens"), images.get("max_tokens"))

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Tokens of each image `(H, W)` and unpruned video `(T, H, W)` alone in a prompt (what vLLM asks).
        Pruned counts depend on the pixels: a server reads them from the processed `compression_mask`."""
        options = self._options(kwargs, "_get_num_multimodal_tokens")
        data = {}
        if image_sizes is not None:
            data["num_image_tokens"] = [self._unpruned([(1, h, w)], [False], options)[0] for h, w in image_sizes]
            data["num_image_patches"] = [1] * len(image_sizes)
        if video_sizes is not None:
            data["num_video_tokens"] = [self._unpruned([tuple(s)], [True], options)[0] for s in video_sizes]
        return MultiModalData(**data)

    def save_pretrained(self, save_directory, **kwargs):
        """Save as `ProcessorMixin` does, but keep the processor's `auto_map` out of tokenizer_config.json,
        so the tokenizer alone loads as a plain Qwen2 tokenizer."""
        saved = super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, "tokenizer_config.json")
        with open(path, encoding="utf-8") as file:
            config = json.load(file)
        if config.pop("auto_map", None) is not None:
            with open(path, "w", encoding="utf-8") as file:
                file.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return saved

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens=True, **kwargs):
        """Decode generated ids `(B, L)` (or `(L,)`) to a list of strings."""
        if isinstance(generated_outputs, (torch.Tensor, np.ndarray)) and generated_outputs.ndim == 1:
            generated_outputs = generated_outputs[None]  # (1, L)
        elif isinstance(generated_outputs, (list, tuple)) and generated_outputs and isinstance(generated_outputs[0], (int, np.integer)):
            generated_outputs = [generated_outputs]
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "grid_sizes", "merge_sizes", "compression_mask"]


def _stamp(seconds: float) -> str:
    """A timestamp as the template prints it (`round(1) | string`)."""
    return str(round(float(seconds), 1))


def _assistant_masks(offset_mapping, generation_spans, shifts) -> list[list[int]]:
    """1 for tokens inside a `{% generation %}` span, the spans shifted past the placeholders expanded before them."""
    masks = []
    for offsets, spans, sample_shifts in zip(offset_mapping, generation_spans, shifts):
        ends = [end for end, _ in sample_shifts]
        gained = np.cumsum([0] + [added for _, added in sample_shifts]).tolist()
        mask = [0] * len(offsets)
        for start, end in spans:
            start, end = start + gained[bisect.bisect_right(ends, start)], end + gained[bisect.bisect_right(ends, end)]
            for position, (token_start, token_end) in enumerate(offsets):
                if token_start < end and token_end > start:
                    mask[position] = 1
        masks.append(mask)
    return masks


def _per_sample(images, count: int) -> list:
    """Images given beside conversations: one list per conversation, or a flat list for the first."""
    if images is None:
        return [[] for _ in range(count)]
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if count > 1 and len(images) == count and all(isinstance(x, (list, tuple)) for x in images):
        return [list(x) for x in images]
    return [images] + [[] for _ in range(count - 1)]


def _distribute(media, prompts, marker, name) -> list:
    """`media` split over prompts by their marker counts: flat in prompt order, or one list per prompt (images)."""
    counts = [p.count(marker) for p in prompts]
    items = as_video_list(media) if name == "videos" else [] if media is None else list(media) if isinstance(media, (list, tuple)) else [media]
    if name == "images" and len(items) == len(prompts) and all(isinstance(x, (list, tuple)) for x in items):
        nested = [list(x) for x in items]
    else:
        if len(items) != sum(counts):
            raise ValueError(f"the prompts have {sum(counts)} {marker} markers in total but {len(items)} {name} were given")
        bounds = np.cumsum([0] + counts).tolist()
        nested = [items[a:b] for a, b in zip(bounds, bounds[1:])]
    for index, (count, sample_items) in enumerate(zip(counts, nested)):
        if len(sample_items) != count:
            raise ValueError(f"sample {index} has {count} {marker} markers but {len(sample_items)} {name} were given")
    return nested


__all__ = ["Videollama3Qwen2Processor", "Videollama3ProcessorKwargs", "CHAT_TEMPLATE", "SYSTEM_PROMPT"]
