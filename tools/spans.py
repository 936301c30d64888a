"""Turn VideoLLaMA3 temporal-grounding answers into `(start, end)` spans in seconds.

The model answers grounding questions in text, as the official evaluation expects ("12.0-18.5
seconds"). People and other models phrase the same span in many ways; all of these parse:

    "12.0-18.5 seconds"          "3.0 - 5.0 s"            "from 3 to 5 s"
    "between 3s and 5s"          "3.0–5.0 sec"            "00:03-00:05"  (mm:ss, hh:mm:ss)
    "The red circle appears from 2.5 to 4 seconds."       "[3.0, 5.0]"

Anything else (no two times, or an end before the start) raises `ValueError` naming the text.
"""

import re

__all__ = ["parse_span", "format_span"]

# A time: h:mm:ss(.f), mm:ss(.f), or a plain number of seconds.
_TIME = r"(?:\d+:)?\d+:\d+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"
_UNIT = r"\s*(?:seconds?|secs?|s)\b\.?"
_SEP = r"\s*(?:-|–|—|~|to|and|until|till|,)\s*"
_SPAN = re.compile(
    rf"(?P<start>{_TIME})(?:{_UNIT})?{_SEP}(?P<end>{_TIME})(?:{_UNIT})?",
    re.IGNORECASE,
)


def _seconds(text: str) -> float:
    parts = text.split(":")
    value = 0.0
    for part in parts:
        value = value * 60 + float(part)
    return value


def parse_span(answer: str) -> tuple[float, float]:
    """Return the first time span in `answer` as `(start, end)` seconds.

    Raises:
        ValueError: `answer` is not a string, holds no span of two times, or its end precedes its start.
    """
    if not isinstance(answer, str):
        raise ValueError(f"expected a string answer, got {type(answer).__name__}")
    match = _SPAN.search(answer)
    if match is None:
        raise ValueError(f"no time span (start and end) found in {answer!r}")
    start, end = _seconds(match["start"]), _seconds(match["end"])
    if end < start:
        raise ValueError(f"span in {answer!r} ends ({end}) before it starts ({start})")
    return start, end


def format_span(start: float, end: float) -> str:
    """The answer format the tiny model is trained on: `"3.0-5.0 seconds"`."""
    return f"{start:.1f}-{end:.1f} seconds"
