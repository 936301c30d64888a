"""The temporal-span parser accepts the usual phrasings and rejects everything else."""

import pytest

from tools.spans import format_span, parse_span


@pytest.mark.parametrize(
    "answer, span",
    [
        ("12.0-18.5 seconds", (12.0, 18.5)),
        ("3.0-5.0 seconds", (3.0, 5.0)),
        ("3.0 - 5.0 s", (3.0, 5.0)),
        ("from 3 to 5 s", (3.0, 5.0)),
        ("From 3s to 5s.", (3.0, 5.0)),
        ("between 3 and 5 seconds", (3.0, 5.0)),
        ("3.0–5.0 sec", (3.0, 5.0)),
        ("[3.0, 5.0]", (3.0, 5.0)),
        ("00:03-00:05", (3.0, 5.0)),
        ("01:02:03 to 01:02:04.5", (3723.0, 3724.5)),
        ("The red circle appears from 2.5 to 4 seconds.", (2.5, 4.0)),
        ("0-0 seconds", (0.0, 0.0)),
    ],
)
def test_parses(answer, span):
    assert parse_span(answer) == span


@pytest.mark.parametrize("answer", ["", "garbage", "a red circle", "3 seconds", "5.0-3.0 seconds", "seconds - seconds"])
def test_garbage_raises_value_error_naming_the_text(answer):
    with pytest.raises(ValueError, match="span|ends"):
        parse_span(answer)


def test_non_string_raises():
    with pytest.raises(ValueError, match="string"):
        parse_span(None)


def test_format_round_trips():
    assert format_span(3, 5.5) == "3.0-5.5 seconds"
    assert parse_span(format_span(2.0, 7.0)) == (2.0, 7.0)
