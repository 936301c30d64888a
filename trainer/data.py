"""Training data: the official and the messages formats, media loading, labels, padding and packing.

Two row formats are read (JSON, JSONL or parquet through `datasets`):

* official (the DAMO repository's): `{"image": path | [paths], "video": path | [paths],
  "conversations": [{"from": "human" | "gpt" | "system", "value": "<image>\\n..."}]}`; each
  `<image>` / `<video>` tag in a value stands for the next image / video of the row, and media
  without tags go before the first user text. Videos may be `{"video_path", "start_time",
  "end_time"}` dicts; top-level `start_time` / `end_time` apply to every video of the row.
* messages (transformers): `{"messages": [{"role", "content": str | [items]}], "images": [...],
  "videos": [...]}`, items `{"type": "image"|"video"|"text", ...}`; an item without payload is
  filled from the `images` / `videos` column in order (TRL's convention).

A row becomes a `Conversation` (messages in the processor's content-item format, media still as
references); `SampleEncoder` resolves media paths against the data root and runs the processor's
chat template (which decodes the media) with assistant masks, giving an `EncodedSample` whose
labels cover only assistant replies and their `<|im_end|>`. `Videollama3DataCollator` pads such samples into a batch, or packs them
into one padding-free row with `position_ids` restarting per sample.
"""

import hashlib
import json
import logging
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import torch
from torch.utils.data import get_worker_info

logger = logging.getLogger(__name__)

INDEX_COLUMN = "sample_index"
SOURCE_COLUMN = "sample_source"  # the file (or Hub dataset) a row came from, for error messages
RECORD_COLUMN = "record_json"  # fallback storage of rows that Arrow cannot type (mixed str/list fields)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TAG = re.compile(r"(<image>|<video>)")
IGNORE_INDEX = -100


class SampleError(ValueError):
    """A training sample that cannot be used; names the data file (when known), the sample index
    and the media path."""

    def __init__(self, index, message, path=None, source=None):
        self.index, self.path, self.source, self.cause = index, path, source, message
        where = f" (media {path!r})" if path is not None else ""
        super().__init__(f"{source + ', ' if source else ''}sample {index}{where}: {message}")

    def with_source(self, source: str | None) -> "SampleError":
        """The same error, naming `source` (the data file) too."""
        if source is None or self.source is not None:
            return self
        return type(self)(self.index, self.cause, self.path, source)


class MediaLoadError(SampleError):
    """A sample's image or video is missing or cannot be decoded."""


class SampleTooLongError(SampleError):
    """A sample longer than `max_length`; truncating it could cut through a visual block."""


class TooManySkippedError(ValueError):
    """More rows were skipped under `media_error_policy="skip"` than `max_skipped_fraction` allows."""


# The streaming skip guard waits for this many encoded rows, so one bad row among the first few
# does not stop a run whose overall share of bad rows is small.
SKIP_GUARD_MIN_ROWS = 20
# Errors quoted when the guard stops a run.
QUOTED_ERRORS = 3


def check_skipped(skipped: int, total: int, limit: float, errors: list, where: str) -> None:
    """Raise `TooManySkippedError` when `skipped` of `total` rows is more than the share `limit`."""
    if total and skipped / total > limit:
        quoted = "; ".join(str(e) for e in errors[:QUOTED_ERRORS])
        raise TooManySkippedError(
            f"skipped {skipped} of {total} rows {where} ({skipped / total:.1%}), more than "
            f"max_skipped_fraction={limit:.1%}; first errors: {quoted}. Fix the data, or raise "
            "--max_skipped_fraction if losing these rows is intended"
        )


# ----------------------------------------------------------------------------------------------
# Loading rows


def load_records(source: str, split: str = "train") -> datasets.Dataset:
    """Rows of a JSON / JSONL / parquet file, a directory of them, or a Hub dataset name.

    A `sample_index` column (the row number) and a `sample_source` column (the file it came
    from) are added so errors can name the sample. No rows at all is a `ValueError`.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in (".json", ".jsonl", ".parquet"))
        if not files:
            raise FileNotFoundError(f"no .json, .jsonl or .parquet files in {source}")
    elif path.exists():
        files = [str(path)]
    else:
        files = None
    if files is None:
        dataset = datasets.load_dataset(source, split=split)  # a Hub dataset (online only)
        counts = {}
    else:
        files = [f for f in files if os.path.getsize(f) > 0]  # datasets cannot read an empty file
        # With several files, each row's file is found by counting rows (one more read of each).
        counts = {f: _count_rows(f) for f in files} if len(files) > 1 else {}
        files = [f for f in files if counts.get(f, 1)]  # nor one holding no rows (`[]`)
        if not files:
            raise ValueError(f"no training rows in {source}")
        if all(f.endswith(".parquet") for f in files):
            dataset = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            try:
                dataset = datasets.load_dataset("json", data_files=files, split="train")
            except Exception as error:  # Arrow cannot type e.g. "image" as str in one row, list in another
                logger.info("datasets could not type %s (%s); storing rows as JSON strings", source, error)
                dataset = datasets.Dataset.from_dict({RECORD_COLUMN: [json.dumps(r) for f in files for r in _read_json(f)]})
    if len(dataset) == 0:
        raise ValueError(f"no training rows in {source}")
    sources = [f for f, count in counts.items() for _ in range(count)]
    if len(sources) != len(dataset):  # one file (or datasets read them otherwise than `_count_rows`)
        sources = [files[0] if files and len(files) == 1 else source] * len(dataset)
    return dataset.add_column(INDEX_COLUMN, list(range(len(dataset)))).add_column(SOURCE_COLUMN, sources)


def _count_rows(file: str) -> int:
    """Rows in one data file (0 for an empty file, `[]` or blank lines)."""
    if file.endswith(".parquet"):
        return pq.ParquetFile(file).metadata.num_rows
    return len(_read_json(file))


def _read_json(file: str) -> list[dict]:
    with open(file, encoding="utf-8") as handle:
        text = handle.read()
    if not text.strip():
        return []
    try:
        if file.endswith(".jsonl"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON{' Lines' if file.endswith('.jsonl') else ''}: {error}") from error
    return data if isinstance(data, list) else [data]


def row_record(row: dict) -> dict:
    """A dataset row as the original record (undoing the JSON-string fallback)."""
    if RECORD_COLUMN in row and row[RECORD_COLUMN] is not None:
        return json.loads(row[RECORD_COLUMN])
    return row


# ----------------------------------------------------------------------------------------------
# Rows -> conversations


@dataclass
class MediaRef:
    """An image or video of a sample before decoding."""

    kind: str  # "image" or "video"
    source: object  # a path (relative to the data root or absolute), or in-memory pixels
    start_time: float | None = None
    end_time: float | None = None


@dataclass
class Conversation:
    """A sample in the processor's message format; visual items hold a `MediaRef` under their kind."""

    index: int
    messages: list[dict]
    source: str | None = None  # the data file, for error messages

    @property
    def media(self) -> list[MediaRef]:
        return [item[item["type"]] for m in self.messages for item in m["content"] if item["type"] in ("image", "video")]


def row_index(row: dict, record: dict | None = None) -> int | None:
    """The dataset index a row carries (`INDEX_COLUMN`), in either row format; `record`: the row's
    `row_record`, when already decoded."""
    record = row_record(row) if record is None else record
    return record.get(INDEX_COLUMN, row.get(INDEX_COLUMN))


def to_conversation(row: dict, index: int | None = None) -> Conversation:
    """Either row format as a `Conversation`; raises `SampleError` (naming the row's data file) for
    a malformed row."""
    record = row_record(row)
    index = row_index(row, record) if index is None else index
    source = record.get(SOURCE_COLUMN, row.get(SOURCE_COLUMN))
    try:
        if record.get("conversations") is not None:
            return Conversation(index, _official_messages(record, index), source)
        if record.get("messages") is not None:
            return Conversation(index, _messages_format(record, index), source)
        keys = sorted(k for k, v in record.items() if v is not None and k not in (INDEX_COLUMN, SOURCE_COLUMN))
        raise SampleError(index, f"has neither 'conversations' nor 'messages' (keys: {keys})")
    except SampleError as error:
        raise error.with_source(source)  # the same error where it names a file already or none is known


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _video_ref(value, record) -> MediaRef:
    start, end = record.get("start_time"), record.get("end_time")
    if isinstance(value, dict):
        source = value.get("video_path") or value.get("path") or value.get("video")
        return MediaRef("video", source, value.get("start_time", start), value.get("end_time", end))
    return MediaRef("video", value, start, end)


def _image_ref(value) -> MediaRef:
    if isinstance(value, dict):
        value = value.get("image_path") or value.get("path") or value.get("image")
    return MediaRef("image", value)


def _official_messages(record: dict, index) -> list[dict]:
    pending = {"image": [_image_ref(v) for v in _as_list(record.get("image"))],
               "video": [_video_ref(v, record) for v in _as_list(record.get("video"))]}
    for kind in ("image", "video"):
        tags = sum(str(turn.get("value") or "").count(f"<{kind}>") for turn in record["conversations"])
        if tags > len(pending[kind]):
            raise SampleError(index, f"has {tags} <{kind}> tags but {len(pending[kind])} {kind} entries")
    messages = []
    for turn in record["conversations"]:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise SampleError(index, f"unknown speaker {turn.get('from')!r} (expected human, gpt or system)")
        content = []
        pieces = TAG.split(turn.get("value") or "")
        for position, piece in enumerate(pieces):
            if piece in ("<image>", "<video>"):
                kind = piece[1:-1]
                content.append({"type": kind, kind: pending[kind].pop(0)})  # counted above: never runs out
                continue
            # The template writes the newline after a visual block itself.
            if position > 0:
                piece = piece.lstrip("\n")
            if position + 1 < len(pieces):
                piece = piece.rstrip("\n")
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    _place_leftovers(messages, pending, index)
    return messages


def _messages_format(record: dict, index) -> list[dict]:
    pending = {"image": [_image_ref(v) for v in _as_list(record.get("images") or record.get("image"))],
               "video": [_video_ref(v, record) for v in _as_list(record.get("videos") or record.get("video"))]}
    messages = []
    for message in record["messages"]:
        role = ROLES.get(message.get("role"))
        if role is None:
            raise SampleError(index, f"unknown role {message.get('role')!r}")
        raw = message.get("content")
        items = [{"type": "text", "text": raw}] if isinstance(raw, str) else list(raw or [])
        content = []
        for item in items:
            kind = item.get("type")
            if kind == "text":
                if item.get("text"):
                    content.append({"type": "text", "text": item["text"]})
            elif kind in ("image", "video"):
                payload = item.get(kind) or item.get("path") or item.get("url")
                if payload is None:  # a placeholder filled from the images / videos column
                    if not pending[kind]:
                        raise SampleError(index, f"has more {kind} placeholders than entries in '{kind}s'")
                    ref = pending[kind].pop(0)
                else:
                    ref = _image_ref(payload) if kind == "image" else _video_ref(payload, record)
                if kind == "video":
                    ref.start_time = item.get("start_time", ref.start_time)
                    ref.end_time = item.get("end_time", ref.end_time)
                content.append({"type": kind, kind: ref})
            else:
                raise SampleError(index, f"unsupported content item type {kind!r}")
        messages.append({"role": role, "content": content})
    _place_leftovers(messages, pending, index)
    return messages


def _place_leftovers(messages, pending, index):
    """Media a row lists but never references go before the first user text (videos first)."""
    leftovers = [{"type": k, k: ref} for k in ("video", "image") for ref in pending[k]]
    if not leftovers:
        return
    for message in messages:
        if message["role"] == "user":
            message["content"] = leftovers + message["content"]
            return
    raise SampleError(index, "has media but no user turn to attach them to")


# ----------------------------------------------------------------------------------------------
# Media


def resolve_path(source, data_root: str | None) -> object:
    if isinstance(source, (str, os.PathLike)) and "://" not in str(source) and not os.path.isabs(source):
        return os.path.join(data_root, source) if data_root else str(source)
    return source


def find_bad_rows(dataset: datasets.Dataset, data_root: str | None) -> list[SampleError]:
    """One error per row that is malformed or names a media file that does not exist (a cheap
    pass: rows are parsed, media are not decoded)."""
    bad = []
    for row in dataset:
        try:
            conversation = to_conversation(row)
        except SampleError as error:
            bad.append(error)
            continue
        missing = [str(path) for ref in conversation.media
                   if isinstance(path := resolve_path(ref.source, data_root), (str, os.PathLike))
                   and "://" not in str(path) and not os.path.exists(path)]
        if missing:
            bad.append(MediaLoadError(conversation.index, "media file not found", ", ".join(missing), conversation.source))
    return bad


def check_rows(dataset: datasets.Dataset, data_root: str | None, policy: str,
               max_skipped_fraction: float = 1.0) -> datasets.Dataset:
    """Fail on (policy `fail`) or drop (policy `skip`, counted and logged) rows that are malformed
    or have missing media; under `skip`, more than `max_skipped_fraction` of the rows is an error."""
    bad = find_bad_rows(dataset, data_root)
    if not bad:
        return dataset
    if policy == "fail":
        first = bad[0]
        if len(bad) == 1:
            raise first
        raise type(first)(first.index, f"{first.cause} ({len(bad)} bad rows in total)", first.path, first.source)
    for error in bad:
        logger.warning("skipping %s", error)
    logger.warning("skipped %d of %d rows before training (malformed or missing media)", len(bad), len(dataset))
    check_skipped(len(bad), len(dataset), max_skipped_fraction, bad, "before training")
    indices = {error.index for error in bad}
    return dataset.filter(lambda row: row[INDEX_COLUMN] not in indices)


def processor_messages(conversation: Conversation, data_root: str | None) -> list[dict]:
    """The conversation with media paths resolved against `data_root`, in the processor's item format.

    Decoding is left to the processor (PyAV for videos, Pillow for images), which also applies
    each video's `start_time` / `end_time`, so training sees media exactly as inference does.
    """
    messages = []
    for message in conversation.messages:
        content = []
        for item in message["content"]:
            if item["type"] not in ("image", "video"):
                content.append(dict(item))
                continue
            ref: MediaRef = item[item["type"]]
            loaded = {"type": ref.kind, ref.kind: resolve_path(ref.source, data_root)}
            if ref.kind == "video":
                loaded.update({k: v for k, v in (("start_time", ref.start_time), ("end_time", ref.end_time)) if v is not None})
            content.append(loaded)
        messages.append({"role": message["role"], "content": content})
    return messages


def media_paths(messages: list[dict]) -> list[str]:
    return [str(item[item["type"]]) for m in messages for item in m["content"]
            if item["type"] in ("image", "video") and isinstance(item[item["type"]], (str, os.PathLike))]


# ----------------------------------------------------------------------------------------------
# Encoding


@dataclass
class EncodedSample:
    """One tokenized sample. Visual tensors are None for a text-only sample."""

    index: int
    input_ids: torch.Tensor  # (S,)
    labels: torch.Tensor  # (S,), IGNORE_INDEX outside assistant replies
    pixel_values: torch.Tensor | None = None  # (N, 3*14*14)
    grid_sizes: torch.Tensor | None = None  # (k, 3)
    merge_sizes: torch.Tensor | None = None  # (k,)
    compression_mask: torch.Tensor | None = None  # (M,)


# `SampleEncoder.processor_kwargs` that only images / only videos are encoded with (`media_settings`).
IMAGE_ONLY_KWARGS = ("image_merge_size",)
VIDEO_ONLY_KWARGS = ("fps", "max_frames", "video_merge_size", "use_token_compression")


class SampleCache:
    """Encoded samples in memory, least recently used out first once more than `max_size` are held.

    `SampleEncoder` keys each sample by its own `fingerprint`, the settings its media are encoded
    with (`media_settings`) and the row's content, so one cache can serve several encoders: stages
    run one after another in one process (`python -m trainer`'s `main(..., sample_cache=...)`)
    decode a row they encode alike once, and an encoder with other settings, processor or
    tokenizer never gets another's samples.
    """

    def __init__(self, max_size: int):
        if max_size < 1:
            raise ValueError(f"max_size={max_size}: a sample cache holds at least one sample")
        self.max_size = max_size
        self._samples: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._samples)

    def get(self, key) -> EncodedSample | None:
        sample = self._samples.get(key)
        if sample is not None:
            self._samples.move_to_end(key)
        return sample

    def put(self, key, sample: EncodedSample) -> None:
        self._samples[key] = sample
        self._samples.move_to_end(key)
        if len(self._samples) > self.max_size:
            self._samples.popitem(last=False)


def _config_json(processor) -> str:
    """A processor's saved config as JSON; `repr` where it cannot serialise itself."""
    try:
        return processor.to_json_string()
    except (TypeError, ValueError, AttributeError):
        return repr(processor)


@dataclass
class SampleEncoder:
    """Turns a dataset row into an `EncodedSample` with the processor's chat template.

    Labels come from the template's `{% generation %}` markers (`return_assistant_tokens_mask`):
    every assistant reply and its `<|im_end|>` is supervised, nothing else. A sample longer than
    `max_length` raises `SampleTooLongError` instead of being truncated; media that cannot be
    loaded raise `MediaLoadError` naming the sample index and the path.

    `cache_size`: keep up to that many encoded samples in memory (least recently used out first),
    keyed by the row's content, so a row seen again (another epoch, or a copy in a mixture) skips
    decoding, resizing and tokenizing; the processor is deterministic, so the sample is the same
    as long as the media files do not change during the run. Rows holding media in memory rather
    than as paths are not cached. Each entry holds its pixel patches, so memory grows with it.
    0 (default) caches nothing. `cache`: a `SampleCache` to use instead, which other encoders
    may share (it keys each sample by the encoder's `fingerprint` as well).
    """

    processor: object
    data_root: str | None = None
    max_length: int | None = None
    # The processor's media options; None leaves the processor's own default.
    fps: float | None = None
    max_frames: int | None = None
    image_merge_size: int | None = None
    video_merge_size: int | None = None
    max_visual_tokens: int | None = None
    use_token_compression: bool | None = None
    add_system_prompt: bool = False
    cache_size: int = 0
    cache: SampleCache | None = None

    def __post_init__(self):
        if self.cache is None and self.cache_size:
            self.cache = SampleCache(self.cache_size)

    def __call__(self, row: dict) -> EncodedSample:
        if self.cache is None:
            return self.encode(row)
        try:
            content = json.dumps({k: v for k, v in row.items() if k not in (INDEX_COLUMN, SOURCE_COLUMN)}, sort_keys=True)
        except TypeError:  # in-memory media (PIL images, bytes, arrays) have no content key: not cached
            return self.encode(row)
        conversation = to_conversation(row)
        key = (self.fingerprint, self.media_settings({media.kind for media in conversation.media}), content)
        cached = self.cache.get(key)
        if cached is not None:
            return replace(cached, index=conversation.index)
        sample = self.encode(row, conversation)
        self.cache.put(key, sample)
        return sample

    def media_settings(self, kinds: set[str]) -> tuple:
        """The processor settings that decide how a row with media of `kinds` is encoded: all of
        `processor_kwargs` but the image-only ones for a row without images and the video-only ones
        for a row without videos, so stages that differ only in how images are merged share their
        video and text samples (tested: a video-only row encodes alike at either image merge size)."""
        left_out = (IMAGE_ONLY_KWARGS if "image" not in kinds else ()) + (VIDEO_ONLY_KWARGS if "video" not in kinds else ())
        return tuple((k, v) for k, v in sorted(self.processor_kwargs().items()) if k not in left_out)

    @cached_property
    def fingerprint(self) -> str:
        """A digest of everything besides the row and its `media_settings` that decides its encoded
        sample: the other settings, the processor's config (with its image processor's), the tokenizer's
        vocabulary and merges, and the chat template. Rows that agree in all three encode alike."""
        processor = self.processor
        tokenizer = getattr(processor, "tokenizer", processor)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        parts = {
            "settings": [self.data_root, self.max_length, self.add_system_prompt],
            "processor": _config_json(processor),  # its image processor's config included
            "tokenizer": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
            "special_tokens": [str(tokenizer.special_tokens_map), tokenizer.padding_side],
            "chat_template": [getattr(processor, "chat_template", None), getattr(tokenizer, "chat_template", None)],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def encode(self, row: dict, conversation: Conversation | None = None) -> EncodedSample:
        """`row` encoded; `conversation`: its `to_conversation`, when the caller already has it."""
        conversation = to_conversation(row) if conversation is None else conversation
        messages = processor_messages(conversation, self.data_root)
        try:
            out = self.processor.apply_chat_template(
                messages,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                return_assistant_tokens_mask=True,
                add_system_prompt=self.add_system_prompt,
                processor_kwargs=self.processor_kwargs(),
            )
        except (OSError, ValueError, TypeError, RuntimeError) as error:
            paths = media_paths(messages)
            named = [p for p in paths if p in str(error)] or paths
            kind = MediaLoadError if named and _is_media_error(error, named) else SampleError
            raise kind(conversation.index, f"{type(error).__name__}: {error}", ", ".join(named) or None,
                       conversation.source) from error
        input_ids = torch.as_tensor(out["input_ids"])[0]  # (S,)
        if "assistant_masks" not in out:
            raise ValueError(
                "the processor returned no 'assistant_masks': its chat template needs {% generation %} markers "
                "around assistant replies (including <|im_end|>)"
            )
        mask = torch.as_tensor(out["assistant_masks"])[0].bool()  # (S,)
        labels = input_ids.masked_fill(~mask, IGNORE_INDEX)
        if self.max_length is not None and input_ids.numel() > self.max_length:
            raise SampleTooLongError(
                conversation.index,
                f"has {input_ids.numel()} tokens, more than max_length={self.max_length}; it is not truncated "
                "because truncation could cut through a visual block (raise max_length or lower max_visual_tokens)",
                source=conversation.source,
            )
        if not bool(mask.any()):
            logger.warning("sample %s has no assistant tokens to learn from", conversation.index)
        sample = EncodedSample(conversation.index, input_ids, labels)
        if out.get("pixel_values") is not None:
            sample.pixel_values = torch.as_tensor(out["pixel_values"])
            sample.grid_sizes = torch.as_tensor(out["grid_sizes"]).long()
            sample.merge_sizes = torch.as_tensor(out["merge_sizes"]).long()
            compression = out.get("compression_mask")
            sample.compression_mask = None if compression is None else torch.as_tensor(compression).bool()
        return sample

    def processor_kwargs(self) -> dict:
        """The media options that are set (the processor keeps its defaults for the others)."""
        options = {
            "fps": self.fps,
            "max_frames": self.max_frames,
            "image_merge_size": self.image_merge_size,
            "video_merge_size": self.video_merge_size,
            "max_tokens": self.max_visual_tokens,
            "use_token_compression": self.use_token_compression,
        }
        return {k: v for k, v in options.items() if v is not None}


def _is_media_error(error: Exception, named: list[str]) -> bool:
    """Whether the processor's error concerns a media file (rather than, say, the message schema)."""
    text = str(error)
    return isinstance(error, OSError) or any(p in text for p in named) or any(
        word in text for word in ("video", "image", "decod", "corrupt", "not found")
    )


# ----------------------------------------------------------------------------------------------
# Batching


def cat_visual(samples: list[EncodedSample]) -> dict:
    """The visual inputs of `samples`, concatenated in sample order (empty for text-only batches)."""
    visual = [s for s in samples if s.pixel_values is not None]
    if not visual:
        return {}  # the model runs its zero-weighted dummy vision pass in training
    batch = {
        "pixel_values": torch.cat([s.pixel_values for s in visual]),  # (N, 588)
        "grid_sizes": torch.cat([s.grid_sizes for s in visual]),  # (k, 3)
        "merge_sizes": torch.cat([s.merge_sizes for s in visual]),  # (k,)
    }
    if all(s.compression_mask is not None for s in visual):
        batch["compression_mask"] = torch.cat([s.compression_mask for s in visual])  # (M,)
    return batch


def pad_samples(samples: list[EncodedSample], pad_token_id: int) -> dict:
    """Right-padded batch: `input_ids`, `attention_mask`, `labels` `(B, S_max)` plus visual inputs."""
    length = max(s.input_ids.numel() for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        n = s.input_ids.numel()
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = s.input_ids, s.labels, 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **cat_visual(samples)}


def pack_samples(samples: list[EncodedSample]) -> dict:
    """One padding-free row `(1, sum S)`; `position_ids` restart at 0 for every sample.

    No `attention_mask` is returned: transformers then reads sample boundaries from the restarting
    positions (a block-diagonal causal mask for sdpa/eager, varlen `cu_seqlens` for flash-attn).
    The first label of every sample is ignored so no sample learns from its predecessor.
    """
    labels = [s.labels.clone() for s in samples]
    for label in labels:
        label[0] = IGNORE_INDEX
    return {
        "input_ids": torch.cat([s.input_ids for s in samples])[None],  # (1, S)
        "labels": torch.cat(labels)[None],  # (1, S)
        "position_ids": torch.cat([torch.arange(s.input_ids.numel()) for s in samples])[None],  # (1, S)
        **cat_visual(samples),
    }


@dataclass
class Videollama3DataCollator:
    """Encodes raw rows and pads (or packs) them into one model batch.

    Under `media_error_policy="skip"`, a sample that cannot be used (media that fail to decode, too
    long) is counted in `skipped`, logged, and replaced by the next usable row of `dataset` so the
    batch keeps its size; under `fail` the `SampleError` (index and path) propagates. Under `skip`,
    once `SKIP_GUARD_MIN_ROWS` rows were encoded, skipping more than `max_skipped_fraction` of them
    raises `TooManySkippedError` naming the first errors (`check_skipped` checks again without the
    minimum, e.g. at the end of training). Each data-loader worker counts its own rows.

    `worker_niceness`: called in a data-loader worker, the collator first adds this to the
    worker's niceness (once per process), so encoding yields the CPU to the training's threads.
    """

    encoder: SampleEncoder
    pad_token_id: int
    packing: bool = False
    media_error_policy: str = "fail"
    dataset: datasets.Dataset | None = None
    max_replacement_tries: int = 16
    worker_niceness: int = 0
    max_skipped_fraction: float = 1.0
    skipped: Counter = field(default_factory=Counter)
    encoded: int = 0  # rows tried (used or skipped)
    errors: list = field(default_factory=list)  # the first skipped rows' errors
    _niced_process: int | None = field(default=None, init=False, repr=False)

    def __call__(self, rows: list[dict]) -> dict:
        if self.worker_niceness and self._niced_process != os.getpid() and get_worker_info() is not None:
            os.nice(self.worker_niceness)
            self._niced_process = os.getpid()
        samples = [self._encode(row) for row in rows]
        samples = [s for s in samples if s is not None]
        if self.encoded >= SKIP_GUARD_MIN_ROWS:
            self.check_skipped()
        if not samples:
            raise RuntimeError("every sample of this batch was skipped and no replacement could be loaded")
        return pack_samples(samples) if self.packing else pad_samples(samples, self.pad_token_id)

    def check_skipped(self) -> None:
        """Raise `TooManySkippedError` if more than `max_skipped_fraction` of the rows tried were skipped."""
        check_skipped(sum(self.skipped.values()), self.encoded, self.max_skipped_fraction, self.errors,
                      "while encoding")

    def _encode(self, row: dict) -> EncodedSample | None:
        self.encoded += 1
        try:
            return self.encoder(row)
        except SampleError as error:
            if self.media_error_policy == "fail":
                raise
            self._skip(error)
        if self.dataset is None or len(self.dataset) == 0:
            return None
        position = int(row.get(INDEX_COLUMN, 0) or 0)
        for step in range(1, self.max_replacement_tries + 1):
            candidate = self.dataset[(position + step) % len(self.dataset)]
            self.encoded += 1
            try:
                return self.encoder(candidate)
            except SampleError as error:
                self._skip(error)
        return None

    def _skip(self, error: SampleError):
        self.skipped[type(error).__name__] += 1
        if len(self.errors) < QUOTED_ERRORS:
            self.errors.append(error)
        logger.warning("skipping %s (%d skipped so far)", error, sum(self.skipped.values()))


def build_collator(processor, config, dataset=None, sample_cache: SampleCache | None = None) -> Videollama3DataCollator:
    """The collator a `Videollama3SFTConfig` describes; `sample_cache` (shared with other
    collators) replaces the cache of `config.encoded_sample_cache` samples it would make."""
    encoder = SampleEncoder(
        processor,
        data_root=config.data_root,
        max_length=config.max_length,
        fps=config.fps,
        max_frames=config.max_frames,
        image_merge_size=config.image_merge_size,
        video_merge_size=config.video_merge_size,
        max_visual_tokens=config.max_visual_tokens,
        use_token_compression=config.use_token_compression,
        add_system_prompt=config.add_system_prompt,
        cache_size=config.encoded_sample_cache,
        cache=sample_cache,
    )
    tokenizer = getattr(processor, "tokenizer", processor)
    return Videollama3DataCollator(
        encoder, tokenizer.pad_token_id, config.multimodal_packing, config.media_error_policy, dataset,
        worker_niceness=config.dataloader_worker_niceness, max_skipped_fraction=config.max_skipped_fraction,
    )
