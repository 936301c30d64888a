"""VideoLLaMA3 processor: conversations and text in, the model's data contract out.

It holds an image processor and a tokenizer only. Videos are decoded with PyAV and pruned with
DiffFP by `image_processing_videollama3`, so nothing here needs torchvision, torchcodec or an
ffmpeg binary, and `AutoProcessor.from_pretrained(dir, trust_remote_code=True)` works without them.

Output of every call (`BatchFeature`):
    input_ids (B, L) and attention_mask (B, L), padded on `padding_side` (left by default);
    when there is any visual input, over the whole batch in prompt order:
    pixel_values (N, 3*14*14) float32, grid_sizes (k, 3) `[t, gh, gw]`, merge_sizes (k,),
    compression_mask (M,) bool, M = sum of t*(gh/m)*(gw/m), True = keep.
Every `<image>` in a prompt stands for one image or one video frame and is repeated by that
frame's kept merged-token count, so a batch needs no model-side token deletion.
"""

import bisect
import re

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils.chat_template_utils import render_jinja_template

from .image_processing_videollama3 import (
    VideoClip,
    Videollama3ImageProcessor,
    Videollama3ImageProcessorKwargs,
    load_image,
    load_video,
)

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

# Keys a caller may pass per call (directly, or in `processor_kwargs`) to steer media and text.
MEDIA_KEYS = (
    "fps",
    "max_frames",
    "min_tokens",
    "max_tokens",
    "use_token_compression",
    "compression_threshold",
    "compression_min_tokens",
    "image_merge_size",
    "video_merge_size",
)
TEXT_KEYS = (
    "padding",
    "padding_side",
    "truncation",
    "max_length",
    "add_special_tokens",
    "pad_to_multiple_of",
    "return_attention_mask",
)
HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
VIDEO_ITEM_KEYS = ("fps", "max_frames", "start_time", "end_time", "timestamps")
VIDEO_MARKER = "<video>"


def _stamp(seconds: float) -> str:
    """A timestamp as the template prints it (`round(1) | string`)."""
    return str(round(float(seconds), 1))


class _Visual:
    """One image or video of a prompt, resolved to pixels (or a probed video file)."""

    def __init__(self, kind: str, media, where: str):
        self.kind, self.media, self.where = kind, media, where

    @property
    def timestamps(self):
        return list(self.media.timestamps) if self.kind == "video" else None

    @property
    def num_frames(self) -> int:
        return self.media.shape[0] if self.kind == "video" else 1


class Videollama3Qwen2Processor(ProcessorMixin):
    r"""Processor of VideoLLaMA3: any-resolution images, PyAV video sampling, DiffFP, chat template.

    Args:
        image_processor: a `Videollama3ImageProcessor`.
        tokenizer: the Qwen2 tokenizer with the `<image>` token.
        chat_template: Jinja template; defaults to the official one with generation markers.
        fps, max_frames: video sampling defaults (official processor_config.json keys).
        image_merge_size, video_merge_size: merge sizes of images (1) and videos (2).
        use_token_compression, compression_threshold, compression_min_tokens: DiffFP defaults.
        image_token: the placeholder token of images and video frames.

    Calls:
        `processor(conversation=..., add_system_prompt=..., add_generation_prompt=..., return_tensors="pt")`
        (official), `processor(text=..., images=..., videos=...)`, and
        `processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")`.
        `fps`, `max_frames`, `min_tokens`, `max_tokens`, the DiffFP settings and the merge sizes can
        be passed to any of them to override the defaults for that call.
    """

    _auto_class = "AutoProcessor"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        fps=1,
        max_frames=128,
        image_merge_size=1,
        video_merge_size=2,
        use_token_compression=True,
        compression_threshold=0.1,
        compression_min_tokens=1,
        image_token="<image>",
    ):
        if image_processor is None:
            image_processor = Videollama3ImageProcessor()
        if tokenizer is None:
            raise ValueError("Videollama3Qwen2Processor needs a tokenizer")
        self.fps = fps
        self.max_frames = max_frames
        self.image_merge_size = image_merge_size
        self.video_merge_size = video_merge_size
        self.use_token_compression = use_token_compression
        self.compression_threshold = compression_threshold
        self.compression_min_tokens = compression_min_tokens
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token")

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # Load the two parts directly: the generic path goes through Auto classes that look up
        # torchvision-only mappings. `trust_remote_code` is forwarded so that no prompt fires.
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        for private in ("_from_auto", "_from_pipeline"):
            kwargs.pop(private, None)
        hub = {k: kwargs[k] for k in HUB_KEYS if k in kwargs}
        image_settings = {k: kwargs[k] for k in Videollama3ImageProcessorKwargs.__annotations__ if k in kwargs}
        image_processor = Videollama3ImageProcessor.from_pretrained(pretrained_model_name_or_path, **hub, **image_settings)
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, trust_remote_code=trust_remote_code, **hub)
        return [image_processor, tokenizer]

    # ---- options -------------------------------------------------------------------------------

    def _media_options(self, overrides: dict) -> dict:
        options = {
            "fps": self.fps,
            "max_frames": self.max_frames,
            "min_tokens": None,
            "max_tokens": None,
            "use_token_compression": self.use_token_compression,
            "compression_threshold": self.compression_threshold,
            "compression_min_tokens": self.compression_min_tokens,
            "image_merge_size": self.image_merge_size,
            "video_merge_size": self.video_merge_size,
        }
        options.update({k: v for k, v in overrides.items() if v is not None})
        fps = options["fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
            raise ValueError(f"fps must be a number > 0, got {fps!r}")
        for key in ("max_frames", "image_merge_size", "video_merge_size"):
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{key} must be an integer > 0, got {value!r}")
        value = options["compression_min_tokens"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"compression_min_tokens must be an integer >= 0, got {value!r}")
        return options

    @staticmethod
    def _split_kwargs(kwargs: dict, where: str):
        media = {k: kwargs.pop(k) for k in MEDIA_KEYS if k in kwargs}
        text = {k: kwargs.pop(k) for k in TEXT_KEYS if k in kwargs}
        # Nested forms used by the generic HF API.
        for nested in ("text_kwargs", "images_kwargs", "videos_kwargs"):
            for key, value in (kwargs.pop(nested, None) or {}).items():
                if key not in TEXT_KEYS and key not in MEDIA_KEYS:
                    raise TypeError(f"unexpected {nested} key {key!r} for {where}")
                (text if key in TEXT_KEYS else media)[key] = value
        for unsupported in ("do_sample_frames", "num_frames", "video_metadata", "return_mm_token_type_ids"):
            if kwargs.pop(unsupported, None) not in (None, False):
                raise ValueError(
                    f"{unsupported} is not supported by {where}: videos are sampled with fps/max_frames, and "
                    "in-memory frames take their times from a 'timestamps' key"
                )
        return media, text

    # ---- media ---------------------------------------------------------------------------------

    def _load_visual(self, kind: str, payload, item: dict, options: dict, where: str) -> _Visual:
        if kind == "image":
            if isinstance(payload, dict):
                if "image_path" not in payload:
                    raise ValueError(f"{where}: an image dict needs an 'image_path' key, got keys {sorted(payload)}")
                payload = payload["image_path"]
            if payload is None:
                raise ValueError(f"{where}: the image item has no image (give 'image', 'path' or 'url')")
            try:
                frames = load_image(payload)[None]  # (1, H, W, 3): an image is a one-frame item
                return _Visual("image", VideoClip(frames, [0.0], str(where)), where)
            except (ValueError, TypeError) as error:
                raise type(error)(f"{where}: {error}") from None
        settings = {k: item[k] for k in VIDEO_ITEM_KEYS if k in item}
        if isinstance(payload, dict):
            if "video_path" not in payload:
                raise ValueError(f"{where}: a video dict needs a 'video_path' key, got keys {sorted(payload)}")
            settings.update({k: payload[k] for k in VIDEO_ITEM_KEYS if k in payload})
            payload = payload["video_path"]
        if payload is None:
            raise ValueError(f"{where}: the video item has no video (give 'video', 'path' or 'url')")
        fps = settings.get("fps", options["fps"])
        max_frames = settings.get("max_frames", options["max_frames"])
        try:
            media = load_video(
                payload,
                fps=fps,
                max_frames=max_frames,
                start_time=settings.get("start_time"),
                end_time=settings.get("end_time"),
                timestamps=settings.get("timestamps"),
            )
        except (ValueError, TypeError) as error:
            raise type(error)(f"{where}: {error}") from None
        return _Visual("video", media, where)

    def _features(self, visuals: list, options: dict) -> BatchFeature:
        """Pixels of one sample's visual items: one image-processor call, one shared budget."""
        merges = [options["video_merge_size"] if v.kind == "video" else options["image_merge_size"] for v in visuals]
        return self.image_processor(
            [v.media for v in visuals],
            merge_size=merges,
            min_tokens=options["min_tokens"],
            max_tokens=options["max_tokens"],
            use_token_compression=options["use_token_compression"],
            compression_threshold=options["compression_threshold"],
            compression_min_tokens=options["compression_min_tokens"],
            return_tensors="pt",
        )

    # ---- encoding ------------------------------------------------------------------------------

    def _encode(self, prompts, visuals_per_sample, options, text_options, return_tensors, generation_spans=None):
        token = self.image_token
        features, expanded, shifts = [], [], []
        for index, (prompt, visuals) in enumerate(zip(prompts, visuals_per_sample)):
            needed = sum(v.num_frames for v in visuals)
            found = prompt.count(token)
            if found != needed:
                raise ValueError(
                    f"sample {index}: the text has {found} {token} placeholders but its images and video frames "
                    f"need {needed} (one per image and one per video frame)"
                )
            if not visuals:
                expanded.append(prompt)
                shifts.append([])
                continue
            sample = self._features(visuals, options)
            counts = [c for item in self.image_processor.frame_token_counts(
                sample["grid_sizes"], sample["merge_sizes"], sample["compression_mask"]) for c in item]
            parts = prompt.split(token)
            pieces, sample_shifts, position = [parts[0]], [], len(parts[0])
            for count, part in zip(counts, parts[1:]):
                pieces.append(token * count)
                pieces.append(part)
                # (end of this placeholder in the rendered prompt, characters added by expanding it)
                sample_shifts.append((position + len(token), len(token) * (count - 1)))
                position += len(token) + len(part)
            expanded.append("".join(pieces))
            shifts.append(sample_shifts)
            features.append(sample)

        need_offsets = generation_spans is not None
        text_options = dict(text_options)
        text_options.setdefault("padding", len(prompts) > 1)
        text_options.setdefault("padding_side", "left")
        text_options.setdefault("add_special_tokens", False)
        encoding = self.tokenizer(expanded, return_offsets_mapping=need_offsets, **text_options)

        expected = [text.count(token) for text in expanded]
        found = [list(ids).count(self.image_token_id) for ids in encoding["input_ids"]]
        if expected != found:
            raise ValueError(
                f"truncation cut visual placeholders: per sample the prompt needs {expected} {token} tokens but "
                f"input_ids keep {found}; raise max_length or lower max_tokens/max_frames"
            )

        data = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
        if need_offsets:
            data["assistant_masks"] = self._assistant_masks(encoding["offset_mapping"], generation_spans, shifts)
        if features:
            data["pixel_values"] = torch.cat([f["pixel_values"] for f in features])  # (N, D)
            data["grid_sizes"] = torch.cat([f["grid_sizes"] for f in features])  # (k, 3)
            data["merge_sizes"] = torch.cat([f["merge_sizes"] for f in features])  # (k,)
            data["compression_mask"] = torch.cat([f["compression_mask"] for f in features])  # (M,)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @staticmethod
    def _assistant_masks(offset_mapping, generation_spans, shifts):
        masks = []
        for offsets, spans, sample_shifts in zip(offset_mapping, generation_spans, shifts):
            ends = [end for end, _ in sample_shifts]
            gained = np.cumsum([0] + [added for _, added in sample_shifts]).tolist()
            mask = [0] * len(offsets)
            for start, end in spans:
                # Shift the reply past the placeholders expanded before it.
                start += gained[_count_le(ends, start)]
                end += gained[_count_le(ends, end)]
                for position, (token_start, token_end) in enumerate(offsets):
                    if token_start < end and token_end > start:
                        mask[position] = 1
            masks.append(mask)
        return masks

    # ---- public API ----------------------------------------------------------------------------

    def __call__(
        self,
        text=None,
        images=None,
        videos=None,
        conversation=None,
        add_system_prompt=False,
        add_generation_prompt=False,
        return_tensors=None,
        **kwargs,
    ) -> BatchFeature:
        """Encode a conversation (official call) or prompts with images/videos.

        Args:
            text: a prompt or a list of prompts. `<image>` marks an image, `<video>` a video (it
                becomes `Time 0.0s:<image>,Time 1.0s:<image>,...`, one `<image>` per frame).
            images: images for the `<image>` markers: flat in prompt order, or one list per prompt.
            videos: videos for the `<video>` markers, likewise.
            conversation: an official conversation (or a list of them); see `apply_chat_template`.
            kwargs: `fps`, `max_frames`, `min_tokens`, `max_tokens`, DiffFP and merge settings,
                and tokenizer options (`padding`, `padding_side`, `truncation`, `max_length`).
        """
        if conversation is not None:
            if text is not None or images is not None or videos is not None:
                raise ValueError("pass either conversation or text/images/videos, not both")
            return self.apply_chat_template(
                conversation,
                add_system_prompt=add_system_prompt,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=True,
                return_tensors=return_tensors,
                **kwargs,
            )
        if text is None:
            raise ValueError("pass text (prompts with <image>/<video> markers) or conversation")
        media_options, text_options = self._split_kwargs(kwargs, "processor(text=...)")
        if kwargs:
            raise TypeError(f"unexpected argument(s) to the processor: {sorted(kwargs)}")
        options = self._media_options(media_options)
        if isinstance(text, str):
            prompts = [text]
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            prompts = list(text)
        else:
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")

        per_image = self._distribute(images, prompts, self.image_token, "images")
        per_video = self._distribute(videos, prompts, VIDEO_MARKER, "videos")
        rendered, visuals_per_sample = [], []
        for index, prompt in enumerate(prompts):
            pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(VIDEO_MARKER)})", prompt)
            images_left, videos_left = list(per_image[index]), list(per_video[index])  # consumed in order
            visuals, out = [], []
            for piece in pieces:
                if piece == VIDEO_MARKER:
                    visual = self._load_visual("video", videos_left.pop(0), {}, options, f"sample {index} video {len(visuals)}")
                    out.append(",".join(f"Time {_stamp(t)}s:{self.image_token}" for t in visual.timestamps))
                    visuals.append(visual)
                elif piece == self.image_token:
                    visuals.append(self._load_visual("image", images_left.pop(0), {}, options, f"sample {index} image {len(visuals)}"))
                    out.append(piece)
                else:
                    out.append(piece)
            rendered.append("".join(out))
            visuals_per_sample.append(visuals)
        return self._encode(rendered, visuals_per_sample, options, text_options, return_tensors)

    @staticmethod
    def _distribute(media, prompts, marker, name):
        """Split `media` over prompts by their marker counts: flat in prompt order, or for images
        also one list per prompt."""
        counts = [p.count(marker) for p in prompts]
        if name == "videos":
            items = _as_video_list(media)
        elif media is None:
            items = []
        elif isinstance(media, (list, tuple)):
            items = list(media)
        else:
            items = [media]
        if (
            name == "images"
            and len(items) == len(prompts)
            and all(isinstance(x, (list, tuple)) for x in items)
        ):
            nested = [list(x) for x in items]
        else:
            if len(items) != sum(counts):
                raise ValueError(f"the prompts have {sum(counts)} {marker} markers in total but {len(items)} {name} were given")
            nested, start = [], 0
            for count in counts:
                nested.append(items[start : start + count])
                start += count
        for index, (count, sample_items) in enumerate(zip(counts, nested)):
            if len(sample_items) != count:
                raise ValueError(f"sample {index} has {count} {marker} markers but {len(sample_items)} {name} were given")
        return nested

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=False,
        add_system_prompt=False,
        continue_final_message=False,
        return_assistant_tokens_mask=False,
        tokenize=False,
        return_dict=False,
        return_tensors=None,
        processor_kwargs=None,
        tools=None,
        documents=None,
        **kwargs,
    ):
        """Render conversations with the chat template and, with `tokenize=True`, encode them.

        Content items (official and HF forms):
            `{"type": "text", "text": str}`;
            `{"type": "image", "image": path | URL | PIL | array | {"image_path": path}}` (or `"path"`/`"url"`);
            `{"type": "video", "video": path | URL | bytes | (T, H, W, 3) array | [frames] |
              {"video_path", "fps", "max_frames", "start_time", "end_time"}}` (or `"path"`/`"url"`),
            with optional item-level `fps`, `max_frames`, `start_time`, `end_time`, and
            `timestamps` for in-memory frames (otherwise frame i is at i / fps seconds).
        Returns:
            the prompt string(s), or with `tokenize=True` the `input_ids` (or a `BatchFeature`
            with `return_dict=True`; `assistant_masks` too when `return_assistant_tokens_mask`).
        """
        processor_kwargs = dict(processor_kwargs or {})
        media_options, text_options = self._split_kwargs(processor_kwargs, "apply_chat_template")
        loose_media, loose_text = self._split_kwargs(kwargs, "apply_chat_template")
        media_options.update(loose_media)
        text_options.update(loose_text)
        extra_images = processor_kwargs.pop("images", None)
        return_tensors = processor_kwargs.pop("return_tensors", return_tensors)
        if processor_kwargs:
            raise TypeError(f"unexpected processor_kwargs: {sorted(processor_kwargs)}")
        options = self._media_options(media_options)
        template = self._template(chat_template)
        conversations, is_batched = self._batch_conversations(conversation)
        # TRL-style `{"type": "image"}` items without payload take `processor_kwargs["images"]` in order.
        spare = _per_sample(extra_images, len(conversations))
        template_conversations, visuals_per_sample = [], []
        for sample, messages in enumerate(conversations):
            rendered, visuals = self._prepare_messages(messages, sample, options, tokenize, spare[sample])
            template_conversations.append(rendered)
            visuals_per_sample.append(visuals)

        template_kwargs = {**self.tokenizer.special_tokens_map, **kwargs}
        template_kwargs.setdefault("image_token", self.image_token)
        prompts, generation_spans = render_jinja_template(
            conversations=template_conversations,
            tools=tools,
            documents=documents,
            chat_template=template,
            return_assistant_tokens_mask=return_assistant_tokens_mask,
            continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt,
            add_system_prompt=add_system_prompt,
            **template_kwargs,
        )
        if not tokenize:
            return prompts if is_batched else prompts[0]
        encoded = self._encode(
            prompts,
            visuals_per_sample,
            options,
            text_options,
            return_tensors,
            generation_spans if return_assistant_tokens_mask else None,
        )
        if return_dict:
            return encoded
        return encoded["input_ids"]

    def _template(self, chat_template):
        """`chat_template` (a template, or the name of one of several), else the processor's."""
        templates = self.chat_template
        if isinstance(templates, dict) and chat_template in templates:
            return templates[chat_template]
        template = chat_template or (templates.get("default") if isinstance(templates, dict) else templates)
        if not template:
            raise ValueError("no chat template: pass chat_template or load a processor that has one")
        return template

    @staticmethod
    def _batch_conversations(conversation):
        if hasattr(conversation, "messages"):
            conversation = conversation.messages
        if not isinstance(conversation, (list, tuple)) or len(conversation) == 0:
            raise ValueError(
                f"conversation must be a non-empty list of messages (or a list of such lists), got {type(conversation).__name__}"
            )
        first = conversation[0]
        if isinstance(first, (list, tuple)) or hasattr(first, "messages"):
            batch = [c.messages if hasattr(c, "messages") else c for c in conversation]
            return [list(c) for c in batch], True
        return [list(conversation)], False

    def _prepare_messages(self, messages, sample, options, load_images, spare_images):
        """Validate a conversation; return its template copy and its visual items in prompt order."""
        rendered, visuals = [], []
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"conversation {sample} must be a non-empty list of messages")
        for m_index, message in enumerate(messages):
            where = f"conversation {sample} message {m_index}"
            if not isinstance(message, dict):
                raise ValueError(f"{where} must be a dict with 'role' and 'content', got {type(message).__name__}")
            if not isinstance(message.get("role"), str):
                raise ValueError(f"{where} needs a string 'role', got keys {sorted(message)}")
            content = message.get("content")
            if isinstance(content, str):
                rendered.append({k: v for k, v in message.items() if v is not None})
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
                    item = {"type": "image", "url": url.get("url") if isinstance(url, dict) else url}
                    kind = "image"
                if kind == "text":
                    if not isinstance(item.get("text"), str):
                        raise ValueError(f"{item_where} is a text item without a string 'text'")
                    items.append({"type": "text", "text": item["text"]})
                elif kind in ("image", "video"):
                    payload = item.get(kind, item.get("path", item.get("url")))
                    if kind == "image" and payload is None and spare_images:
                        payload = spare_images.pop(0)
                    if kind == "image" and not load_images:
                        visual = None
                    else:
                        visual = self._load_visual(kind, payload, item, options, item_where)
                        visuals.append(visual)
                    copy = {"type": kind, kind: str(visual.where) if visual else "image"}
                    if kind == "video":
                        copy["num_frames"] = visual.num_frames
                        copy["timestamps"] = visual.timestamps
                    elif "timestamp" in item:
                        copy["timestamp"] = float(item["timestamp"])
                    items.append(copy)
                else:
                    raise ValueError(
                        f"{item_where} has unsupported content type {item.get('type')!r}; expected 'text', 'image' or 'video'"
                    )
            rendered.append({**{k: v for k, v in message.items() if v is not None}, "content": items})
        return rendered, visuals

    def num_visual_tokens(self, conversation=None, images=None, videos=None, prune=True, **kwargs) -> list:
        """How many `<image>` tokens each visual item will cost, in prompt order.

        Counts are after the any-resolution resize and, with `prune=True`, after DiffFP (which
        decodes the sampled video frames); `prune=False` only probes videos (no decoding) and gives
        the count before pruning. Per-call `fps`, `max_frames`, `min_tokens`, `max_tokens` and the
        DiffFP / merge settings apply. For a batch of conversations, one list per conversation.
        """
        media_options, _ = self._split_kwargs(kwargs, "num_visual_tokens")
        if kwargs:
            raise TypeError(f"unexpected argument(s): {sorted(kwargs)}")
        options = self._media_options(media_options)
        if conversation is not None:
            conversations, is_batched = self._batch_conversations(conversation)
            samples = [self._prepare_messages(m, i, options, True, [])[1] for i, m in enumerate(conversations)]
        else:
            is_batched = False
            image_list = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
            video_list = _as_video_list(videos)
            samples = [
                [self._load_visual("image", x, {}, options, f"image {i}") for i, x in enumerate(image_list)]
                + [self._load_visual("video", x, {}, options, f"video {i}") for i, x in enumerate(video_list)]
            ]
        results = []
        for visuals in samples:
            if not visuals:
                results.append([])
                continue
            merges = [options["video_merge_size"] if v.kind == "video" else options["image_merge_size"] for v in visuals]
            if not prune or not options["use_token_compression"]:
                results.append(self.image_processor.num_tokens([v.media.shape for v in visuals], merges, options["min_tokens"], options["max_tokens"]))
                continue
            features = self._features(visuals, options)
            counts = self.image_processor.frame_token_counts(features["grid_sizes"], features["merge_sizes"], features["compression_mask"])
            results.append([sum(c) for c in counts])
        return results if is_batched else results[0]

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


def _count_le(sorted_values, value) -> int:
    """How many of `sorted_values` are <= `value`."""
    return bisect.bisect_right(sorted_values, value)


def _per_sample(images, count: int) -> list:
    """Images given beside conversations: one list per conversation, or a flat list for the first."""
    if images is None:
        return [[] for _ in range(count)]
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if count > 1 and len(images) == count and all(isinstance(x, (list, tuple)) for x in images):
        return [list(x) for x in images]
    return [images] + [[] for _ in range(count - 1)]


def _is_frame(value) -> bool:
    return isinstance(value, Image.Image) or (isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim in (2, 3))


def _as_video_list(videos) -> list:
    """`videos` as a list of videos; one video may be a path, an array or a list of frames."""
    if videos is None:
        return []
    if isinstance(videos, (list, tuple)):
        if videos and all(_is_frame(v) for v in videos):
            return [list(videos)]  # one video given as its frames
        return list(videos)
    return [videos]


__all__ = ["Videollama3Qwen2Processor", "CHAT_TEMPLATE", "SYSTEM_PROMPT"]
