"""VideoLLaMA3 processor: conversations and text in; out `input_ids (B, L)`, `attention_mask (B, L)` (left-padded)
and, over the batch in prompt order, `pixel_values (N, C*p*p)`, `grid_sizes (k, 3)` `[T, H, W]`, `merge_sizes (k,)`,
`compression_mask (M,)` (True = keep). Each `<image>` stands for an image or video frame and is repeated by its kept
merged tokens, so DiffFP needs no token deletion in the model and batches work.
"""

import bisect
import difflib
import re
from typing import TypedDict

import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin, TextKwargs
from transformers.utils.chat_template_utils import render_jinja_template

from .image_processing_videollama3 import Videollama3ImageProcessor, check_int, concat, load_image
from .video_processing_videollama3 import Videollama3VideoProcessor, as_video_list, check_sampling

SYSTEM_PROMPT = ("You are VideoLLaMA3 created by Alibaba DAMO Academy, a helpful assistant to help people "
                 "understand images and videos.")

# The official template's output byte for byte, plus `{% generation %}` markers around each assistant
# reply and its `<|im_end|>` for assistant-only loss. It reads the official variables: `add_system_prompt`,
# `image_token`, and per item `num_frames` / `timestamps` (videos) and `timestamp` (images).
CHAT_TEMPLATE = (
    "{%- set image_token = image_token | default('<image>') -%}"
    "{%- macro render_content(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for item in content -%}"
    "{%- if item is string -%}{{- item -}}"
    "{%- elif item['type'] == 'text' or 'text' in item -%}{{- item['text'] -}}"
    "{%- elif item['type'] == 'image' or 'image' in item -%}"
    "{%- if 'timestamp' in item -%}{{- 'Time ' + item['timestamp'] | round(1) | string + 's: ' -}}{%- endif -%}"
    "{{- image_token + '\\n' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{%- for i in range(item['num_frames']) -%}"
    "{%- if 'timestamps' in item -%}{{- 'Time ' + item['timestamps'][i] | round(1) | string + 's:' -}}{%- endif -%}"
    "{{- image_token + ('\\n' if loop.last else ',') -}}{%- endfor -%}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and add_system_prompt and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' -}}{%- endif -%}"
    "{%- set tag = 'stream' if message['role'] == 'stream' else 'im' -%}"
    "{{- '<|' + tag + '_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- render_content(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}{{- '\\n' -}}"
    "{%- elif tag == 'stream' and message['content'] is not string -%}"
    "{{- render_content(message['content']) + '<|stream_end|>' -}}"
    "{%- else -%}{{- render_content(message['content']) + '<|' + tag + '_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

VIDEO_MARKER = "<video>"
VIDEO_ITEM_KEYS = ("fps", "max_frames", "start_time", "end_time", "timestamps")
Videollama3ImagesKwargs = TypedDict("Videollama3ImagesKwargs", {
    "min_tokens": int, "max_tokens": int, "image_merge_size": int}, total=False)
Videollama3VideosKwargs = TypedDict("Videollama3VideosKwargs", {
    "fps": int | float, "max_frames": int, "video_merge_size": int, "use_token_compression": bool,
    "compression_threshold": int | float, "compression_min_tokens": int}, total=False)


class Videollama3ProcessorKwargs(ProcessingKwargs, total=False):
    """Per-call options: the tokenizer's, the token budget of a sample's images and frames, merge sizes, sampling, DiffFP."""

    images_kwargs: Videollama3ImagesKwargs
    videos_kwargs: Videollama3VideosKwargs


OPTIONS = {group: set(typed.__annotations__) - {"return_tensors"} for group, typed in (
    ("text_kwargs", TextKwargs), ("images_kwargs", Videollama3ImagesKwargs), ("videos_kwargs", Videollama3VideosKwargs))}
MEDIA_OPTIONS = OPTIONS["images_kwargs"] | OPTIONS["videos_kwargs"]
OPTION_NAMES = set(OPTIONS) | MEDIA_OPTIONS | OPTIONS["text_kwargs"]  # flat, or grouped as `text_kwargs={...}`


class Videollama3Qwen2Processor(ProcessorMixin):
    r"""Processor of VideoLLaMA3: any-resolution images, PyAV video sampling, DiffFP, the official chat template.

    Takes a `Videollama3ImageProcessor` (whose pixel settings the video processor shares), the Qwen2 tokenizer
    with `<image>`, and the official processor_config.json settings (None: the video processor's defaults).
    Calls: the official `processor(conversation=..., add_system_prompt=..., add_generation_prompt=...)`,
    `processor(text=..., images=..., videos=...)` and `apply_chat_template(messages, tokenize=True, ...)`, each
    with the options of `Videollama3ProcessorKwargs` for that call; any other keyword is a TypeError.
    """

    # The video processor is built here, not a `video_processor` attribute: AutoVideoProcessor requires torchvision.
    _auto_class = "AutoProcessor"
    text_kwargs = {"padding": True, "padding_side": "left", "add_special_tokens": False}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, fps=None, max_frames=None,
                 image_merge_size=1, video_merge_size=2, use_token_compression=None, compression_threshold=None,
                 compression_min_tokens=None, image_token="<image>"):
        if tokenizer is None:
            raise ValueError("Videollama3Qwen2Processor needs a tokenizer")
        image_processor = image_processor or Videollama3ImageProcessor()
        video = dict(fps=fps, max_frames=max_frames, use_token_compression=use_token_compression,
                     compression_threshold=compression_threshold, compression_min_tokens=compression_min_tokens)
        self.video_processor = Videollama3VideoProcessor(
            **image_processor.pixel_settings(), **{k: v for k, v in video.items() if v is not None})
        self.__dict__.update({k: getattr(self.video_processor, k) for k in video})  # saved in processor_config.json
        self.image_merge_size, self.video_merge_size, self.image_token = image_merge_size, video_merge_size, image_token
        self.images_kwargs = {"image_merge_size": image_merge_size}  # this processor's defaults for `_merge_kwargs`
        self.videos_kwargs = {"video_merge_size": video_merge_size, **{k: getattr(self, k) for k in video}}
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token")

    def _options(self, kwargs: dict, where: str) -> dict:
        """Per-call options merged over this processor's; an unknown name is a TypeError."""
        unknown = [k for k in kwargs if k not in OPTION_NAMES]
        unknown += [f"{group}[{k!r}]" for group in OPTIONS for k in kwargs.get(group) or {} if k not in OPTIONS[group]]
        if unknown:
            raise TypeError(f"{where} got unexpected option(s) {unknown}; options are {sorted(MEDIA_OPTIONS)} "
                            "and the tokenizer's (padding, truncation, max_length, ...)")
        options = self._merge_kwargs(Videollama3ProcessorKwargs, **kwargs)
        settings = {**options["images_kwargs"], **options["videos_kwargs"]}
        check_sampling(settings["fps"], settings["max_frames"], name="settings")
        for key, low in (("image_merge_size", 1), ("video_merge_size", 1), ("compression_min_tokens", 0)):
            check_int(key, settings[key], low)
        return options

    def _load(self, kind: str, payload, item: dict, options: dict, where: str) -> tuple:
        """`(kind, media)`: an image as `(Hp, Wp, 3)` uint8, a video as the video processor's sampled video."""
        if isinstance(payload, dict):
            if f"{kind}_path" not in payload:
                raise ValueError(f"{where}: the {kind} dict needs a '{kind}_path' key, got keys {sorted(payload)}")
            item, payload = {**item, **payload}, payload[f"{kind}_path"]
        if payload is None:
            raise ValueError(f"{where}: the {kind} item has no {kind} (give '{kind}', 'path' or 'url')")
        try:
            if kind == "image":
                return kind, load_image(payload)
            settings = {k: item.get(k, options["videos_kwargs"].get(k)) for k in VIDEO_ITEM_KEYS}
            return kind, self.video_processor.fetch_videos(payload, **settings)
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where}: {error}") from None

    def _pixels(self, visuals: list, options: dict) -> tuple[dict, list]:
        """One sample's visual inputs (one token budget for all its items) and each `<image>`'s kept tokens."""
        images, videos = options["images_kwargs"], options["videos_kwargs"]
        merges = [images["image_merge_size"] if kind == "image" else videos["video_merge_size"] for kind, _ in visuals]
        shapes = [(1, *media.shape[:2]) if kind == "image" else media.shape for kind, media in visuals]
        sizes = self.image_processor.target_sizes(shapes, merges, images.get("min_tokens"), images.get("max_tokens"))
        parts, counts = [], []
        for (kind, media), size, m in zip(visuals, sizes, merges):
            if kind == "image":  # only a plain array crosses to the image processor
                parts.append(self.image_processor(media, merge_size=m, sizes=[size], return_tensors="pt"))
            else:
                parts.append(self.video_processor(media, merge_size=m, sizes=[size], return_tensors="pt", **{
                    k: videos[k] for k in ("use_token_compression", "compression_threshold", "compression_min_tokens")}))
            counts += parts[-1]["compression_mask"].view(int(parts[-1]["grid_sizes"][0, 0]), -1).sum(1).tolist()  # (T,)
        return {key: concat([part[key] for part in parts]) for key in parts[0]}, counts

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
                    sample_shifts.append((position + len(token), len(token) * (count - 1)))  # (placeholder end, added)
                    position += len(token) + len(part)
                prompt = "".join(pieces)
            expanded.append(prompt)
            shifts.append(sample_shifts)
        text_options = {k: v for k, v in options["text_kwargs"].items() if k != "return_tensors"}
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
            data[key] = concat([f[key] for f in features])  # pixel_values (N, C*p*p), grid_sizes (k, 3), ...
        return BatchFeature(data=data, tensor_type=return_tensors)

    def __call__(self, text=None, images=None, videos=None, conversation=None, add_system_prompt=False,
                 add_generation_prompt=False, return_tensors=None, **kwargs) -> BatchFeature:
        """Encode a conversation (the official call), or prompts whose `<image>` markers take `images` and whose
        `<video>` markers take `videos` (flat in prompt order, or images one list per prompt); a video becomes
        `Time 0.0s:<image>,Time 1.0s:<image>,...`."""
        if conversation is not None:
            if text is not None or images is not None or videos is not None:
                raise ValueError("pass either conversation or text/images/videos, not both")
            return self.apply_chat_template(conversation, add_system_prompt=add_system_prompt, tokenize=True,
                                            add_generation_prompt=add_generation_prompt, return_dict=True,
                                            return_tensors=return_tensors, processor_kwargs=kwargs)
        options = self._options(kwargs, "processor(text=...)")
        text = [text] if isinstance(text, str) else text
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        per_image = _distribute(images, text, self.image_token, "images")
        per_video = _distribute(videos, text, VIDEO_MARKER, "videos")
        prompts, visuals_per_sample = [], []
        for index, prompt in enumerate(text):
            given, visuals, out = {"image": iter(per_image[index]), "video": iter(per_video[index])}, [], []
            for piece in re.split(f"({re.escape(self.image_token)}|{re.escape(VIDEO_MARKER)})", prompt):
                if piece in (self.image_token, VIDEO_MARKER):
                    kind = "image" if piece == self.image_token else "video"
                    visuals.append(self._load(kind, next(given[kind]), {}, options, f"sample {index} {kind} {len(visuals)}"))
                    if kind == "video":
                        piece = ",".join(f"Time {round(float(t), 1)}s:{self.image_token}" for t in visuals[-1][1].timestamps)
                out.append(piece)
            prompts.append("".join(out))
            visuals_per_sample.append(visuals)
        return self._encode(prompts, visuals_per_sample, options, return_tensors)

    # Overrides the base: the official prompt prints each video's sampled frame times, so videos are
    # sampled before the template renders, and images and videos keep their prompt order.
    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt=False, add_system_prompt=False,
                            continue_final_message=False, return_assistant_tokens_mask=False, tokenize=False,
                            return_dict=False, return_tensors=None, processor_kwargs=None, tools=None, documents=None,
                            **kwargs):
        """Render conversations with the chat template and, with `tokenize=True`, encode them.

        Content items: `{"type": "text", "text": ...}`; `{"type": "image", "image": path | URL | PIL | array |
        {"image_path": ...}}` (or `path` / `url`, or no payload: the next of `processor_kwargs["images"]`);
        `{"type": "video", "video": path | URL | bytes | (T, Hp, Wp, 3) array | [frames] | {"video_path", "fps",
        "max_frames", "start_time", "end_time"}}`, with those settings and `timestamps` (of in-memory frames)
        also on the item. Options go in `processor_kwargs` or loose; other keywords are template variables.
        """
        processor_kwargs = dict(processor_kwargs or {})
        spare, return_tensors = processor_kwargs.pop("images", None), processor_kwargs.pop("return_tensors", return_tensors)
        template = self._template(chat_template)
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_NAMES}
        # Pipelines pass generation settings here too; an unused keyword spelt like an option is a typo.
        typos = {k: difflib.get_close_matches(k, OPTION_NAMES, 1) for k in kwargs
                 if not re.search(rf"\b{re.escape(k)}\b", template)}
        if any(typos.values()):
            raise TypeError("apply_chat_template got unexpected keyword argument(s) "
                            + ", ".join(f"{k!r} (did you mean {m[0]!r}?)" for k, m in typos.items() if m))
        options = self._options({**given, **processor_kwargs}, "apply_chat_template")
        conversation = getattr(conversation, "messages", conversation)  # the pipelines' Chat objects
        batched = isinstance(conversation, (list, tuple)) and isinstance(next(iter(conversation), None), (list, tuple))
        conversations = [getattr(c, "messages", c) for c in conversation] if batched else [conversation]
        spare, rendered, visuals_per_sample = _per_sample(spare, len(conversations)), [], []
        for sample, messages in enumerate(conversations):
            count, where = len(spare[sample]), f"conversation {sample} " * batched  # an index only in a batch
            copy, visuals = self._prepare(messages, where, options, tokenize, spare[sample], template)
            rendered.append(copy)
            visuals_per_sample.append(visuals)
            if spare[sample]:
                raise ValueError(f"{where}the conversation has {count - len(spare[sample])} image items without an "
                                 f"image but {count} images were given in processor_kwargs['images']")
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

    def _template(self, chat_template=None) -> str:
        """`chat_template` (a template, or the name of one of the processor's), else the processor's own."""
        templates = self.chat_template if isinstance(self.chat_template, dict) else {"default": self.chat_template}
        template = templates.get(chat_template, chat_template) or templates.get("default")
        if not template:
            raise ValueError("no chat template: pass chat_template or load a processor that has one")
        return template

    def _prepare(self, messages, where, options, load_images, spare_images, template) -> tuple[list, list]:
        """A checked copy of one conversation for the template, and its visual items in prompt order."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError(f"{where}conversation must be a non-empty list of messages, got {type(messages).__name__}")
        roles = ["system", "user", "assistant"] + ["stream"] * ("stream" in template)
        copy, visuals = [], []
        for m_index, message in enumerate(messages):
            at = f"{where}message {m_index}"
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ValueError(f"{at} must be a dict with a string 'role' and 'content', got "
                                 + (f"keys {sorted(message)}" if isinstance(message, dict) else type(message).__name__))
            if message["role"] not in roles:
                raise ValueError(f"{at} has role {message['role']!r}; the chat template knows {roles}")
            content, message = message.get("content"), {k: v for k, v in message.items() if v is not None}
            if not isinstance(content, (str, list, tuple)):
                raise ValueError(f"{at} needs 'content' as a string or a list of items, got {type(content).__name__}")
            items = content if isinstance(content, str) else []
            for c_index, item in enumerate([] if isinstance(content, str) else content):
                at_item = f"{at} content {c_index}"
                if not isinstance(item, (dict, str)):
                    raise ValueError(f"{at_item} must be a dict or a string, got {type(item).__name__}")
                if isinstance(item, str):
                    items.append(item)
                    continue
                item = {k: v for k, v in item.items() if v is not None}  # Arrow fills absent keys with None
                kind = item.get("type") or next((k for k in ("text", "image", "video") if k in item), None)
                if kind == "image_url":
                    url = item.get("image_url")
                    item, kind = {"type": "image", "url": url.get("url") if isinstance(url, dict) else url}, "image"
                if kind == "text":
                    if not isinstance(item.get("text"), str):
                        raise ValueError(f"{at_item} is a text item without a string 'text'")
                    items.append({"type": "text", "text": item["text"]})
                elif kind in ("image", "video"):
                    payload = item.get(kind, item.get("path", item.get("url")))
                    payload = spare_images.pop(0) if kind == "image" and payload is None and spare_images else payload
                    if kind == "video" or load_images:
                        visuals.append(self._load(kind, payload, item, options, at_item))
                    entry = {"type": kind, kind: kind}
                    if kind == "video":
                        entry.update(num_frames=visuals[-1][1].shape[0], timestamps=visuals[-1][1].timestamps)
                    elif "timestamp" in item:
                        entry["timestamp"] = float(item["timestamp"])
                    items.append(entry)
                else:
                    raise ValueError(f"{at_item} has unsupported content type {kind!r}; expected 'text', 'image' or 'video'")
            copy.append({**message, "content": items})
        return copy, visuals

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Tokens of each image `(Hp, Wp)` and unpruned video `(T, Hp, Wp)` alone in a prompt, as vLLM asks. Pruned
        counts depend on the pixels: a server reads them from the processed `compression_mask`."""
        options = self._options(kwargs, "_get_num_multimodal_tokens")
        images, videos = options["images_kwargs"], options["videos_kwargs"]

        def count(shape, merge):
            return self.image_processor.num_tokens([shape], [merge], images.get("min_tokens"), images.get("max_tokens"))[0]

        image_sizes, video_sizes = image_sizes or [], video_sizes or []
        return MultiModalData(num_image_tokens=[count((1, *size), images["image_merge_size"]) for size in image_sizes],
                              num_image_patches=[1] * len(image_sizes),
                              num_video_tokens=[count(tuple(size), videos["video_merge_size"]) for size in video_sizes])


def _assistant_masks(offset_mapping, generation_spans, shifts) -> list[list[int]]:
    """1 for tokens inside a `{% generation %}` span, spans shifted past the placeholders expanded before them."""
    masks = []
    for offsets, spans, sample_shifts in zip(offset_mapping, generation_spans, shifts):
        ends, gained = [end for end, _ in sample_shifts], np.cumsum([0] + [added for _, added in sample_shifts]).tolist()
        mask = [0] * len(offsets)
        for start, end in spans:
            start, end = start + gained[bisect.bisect_right(ends, start)], end + gained[bisect.bisect_right(ends, end)]
            for position, (token_start, token_end) in enumerate(offsets):
                mask[position] |= int(token_start < end and token_end > start)
        masks.append(mask)
    return masks


def _per_sample(images, count: int) -> list:
    """Images given beside conversations: one list per conversation, or a flat list for the first."""
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    if count > 1 and len(images) == count and all(isinstance(x, (list, tuple)) for x in images):
        return [list(x) for x in images]
    return [images] + [[] for _ in range(count - 1)]


def _distribute(media, prompts, marker, name) -> list:
    """`media` split over prompts by their marker counts: flat in prompt order, or one list per prompt (images)."""
    counts = [p.count(marker) for p in prompts]
    items = as_video_list(media) if name == "videos" else _per_sample(media, 1)[0]
    if name == "images" and len(items) == len(prompts) and all(isinstance(x, (list, tuple)) for x in items):
        nested = [list(x) for x in items]
    elif len(items) != sum(counts):
        raise ValueError(f"the prompts have {sum(counts)} {marker} markers in total but {len(items)} {name} were given")
    else:
        bounds = np.cumsum([0] + counts).tolist()
        nested = [items[a:b] for a, b in zip(bounds, bounds[1:])]
    for index, (count, sample_items) in enumerate(zip(counts, nested)):
        if len(sample_items) != count:
            raise ValueError(f"sample {index} has {count} {marker} markers but {len(sample_items)} {name} were given")
    return nested


__all__ = ["Videollama3Qwen2Processor", "Videollama3ProcessorKwargs", "CHAT_TEMPLATE", "SYSTEM_PROMPT"]
