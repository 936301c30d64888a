"""Timing, result rows and the results table shared by every benchmark.

Every comparison is a ratio measured in the same process on the same machine: ours and the peer are
timed in alternation (ours, peer, ours, peer, ...), a round at a time. The ratio is the median over
rounds of ours/peer within the round: the two runs of a round are seconds apart, so a load change
on a shared machine hits both, and the median discards the rounds where it did not. The table also
shows each side's best repeat (minimum time, maximum rate) and median.
"""

import gc
import statistics
import time
from dataclasses import dataclass, field

from tools.local import REPO_ROOT

OUT_DIR = REPO_ROOT / "bench" / "out"  # git-ignored: cached clips, raw logs


@dataclass
class Stat:
    """Repeated measurements of one quantity (seconds, tokens/s, MiB ...)."""

    values: list[float]

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def best(self, higher_is_better: bool) -> float:
        return self.max if higher_is_better else self.min


@dataclass
class Row:
    """One line of the results table: ours against one reference.

    `ratio` is the median of per-round ratios ours / reference when both were measured in the same
    rounds, else best / best (min for times and memory, max for rates); `target` is a comparison
    such as `<= 0.5` or `>= 1.0` applied to that ratio.
    """

    benchmark: str
    case: str
    unit: str
    ours: Stat
    reference: Stat
    reference_name: str
    target: str | None = None
    higher_is_better: bool = False
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if len(self.ours.values) == len(self.reference.values) > 1 and all(self.reference.values):
            return statistics.median(o / r for o, r in zip(self.ours.values, self.reference.values))
        reference = self.reference.best(self.higher_is_better)
        return self.ours.best(self.higher_is_better) / reference if reference else float("nan")

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        op, bound = self.target.split()
        if self.ratio != self.ratio:  # nan: a zero reference (toy sizes)
            return None
        return self.ratio <= float(bound) if op == "<=" else self.ratio >= float(bound)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall time of one call (after a garbage collection, so earlier garbage is not billed to it)."""
    gc.collect()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def alternate(functions: dict, repeats: int, warmup: int = 1) -> dict[str, Stat]:
    """Time each zero-argument function `repeats` times, interleaved, after `warmup` untimed rounds.

    A single repeat is a smoke run (toy sizes): it skips the warm-up.
    """
    for _ in range(warmup if repeats > 1 else 0):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            times[name].append(timed(fn)[0])
    return {name: Stat(values) for name, values in times.items()}


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def verdict(row: Row) -> str:
    if row.passed is None:
        return "info"
    return "pass" if row.passed else "MISS"


HEADER = ["benchmark", "case", "unit", "ours best / median", "reference", "ref best / median", "ratio", "target", "verdict"]


def table_lines(rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        cells = [
            r.benchmark,
            r.case,
            r.unit,
            f"{fmt(r.ours.best(r.higher_is_better))} / {fmt(r.ours.median)}",
            r.reference_name,
            f"{fmt(r.reference.best(r.higher_is_better))} / {fmt(r.reference.median)}",
            f"{r.ratio:.2f}x",
            f"{r.target}x" if r.target else "",
            verdict(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def print_rows(rows: list[Row]) -> None:
    for line in table_lines(rows):
        print(line, flush=True)


def spec_model(spec):
    """Tokenizer, config and our sdpa model (seed 0) at a benchmark spec's LLM and vision sizes."""
    import torch

    from tools.tiny import tiny_config, tiny_tokenizer
    from tools.local import remote_module

    tokenizer = tiny_tokenizer()
    config = tiny_config(
        tokenizer,
        hidden_size=spec.hidden,
        intermediate_size=spec.mlp,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        vocab_size=spec.vocab,
        vision_encoder_config=dict(
            hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
            num_hidden_layers=spec.vision_layers, num_attention_heads=4, patch_size=14,
        ),
    )
    torch.manual_seed(0)
    model = remote_module("modeling_videollama3").Videollama3Qwen2ForCausalLM._from_config(config, attn_implementation="sdpa")
    return tokenizer, config, model
