"""Run the CPU benchmarks, print ours / reference / ratio, and write `bench/results.md`.

    python -m bench                      # everything, about 5-8 minutes on 2 idle cores
    python -m bench --only video vision  # a subset
    python -m bench --toy                # toy sizes, seconds: proves the code runs, numbers mean nothing

The GPU benchmarks live in `bench/gpu.py` (`python -m bench.gpu`); this command runs them too when
CUDA is present.
"""

import argparse
import datetime
import os
import platform
import sys
import time

from bench.common import REPO_ROOT, Row, fmt, print_rows, table_lines, verdict

BENCHMARKS = ["video", "vision", "memory", "generate", "train"]

METHOD = """\
Method. Each row compares ours with one reference measured in the same process and the same
rounds (ours, reference, ours, reference, ...). The ratio is the median over rounds of the
within-round ratio, so load changes on a shared machine hit both sides of each ratio. "best" is
the minimum over the repeats for times and the maximum for rates; "median" shows the spread.
Memory rows are single measurements (peak RSS growth of one forward in a fresh subprocess; see
bench/memory.py), so their ratio is plain ours/reference.
"""


# Generation is short per call and the noisiest: more rounds for the same minute.
EXTRA_REPEATS = {"generate": 2}


def run_benchmark(name: str, toy: bool, repeats: int) -> list[Row]:
    if name == "video":
        from bench import video as m

        return m.run(m.TOY if toy else m.FULL, repeats)
    if name == "vision":
        from bench import vision as m

        return m.run(m.TOY if toy else m.FULL, repeats) + m.run_training(
            m.TOY if toy else m.FULL, m.TOY_TRAIN_GRIDS if toy else m.TRAIN_GRIDS, repeats)
    if name == "memory":
        from bench import memory as m

        # Toy sizes measure in this process: subprocesses cost seconds each just to import torch.
        return m.run(m.TOY, m.TOY_FRAMES, in_subprocess=False) if toy else m.run(m.FULL, m.FRAMES)
    if name == "generate":
        from bench import generate as m

        return m.run(m.TOY if toy else m.FULL, repeats if toy else repeats + EXTRA_REPEATS[name])
    if name == "train":
        from bench import train as m

        return m.run(m.TOY if toy else m.FULL, repeats)
    raise ValueError(f"unknown benchmark {name!r}; choose from {BENCHMARKS}")


def environment() -> str:
    import torch
    import transformers

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def write_results(path, rows: list[Row], seconds: float, loads: tuple, env: str, failures: dict) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Run {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} with `python -m bench`, {seconds / 60:.1f} min. {env}.",
        f"Load average (1 min) at start {loads[0]:.1f}, at end {loads[1]:.1f}: other processes on the machine "
        "slow both sides of every ratio, but not necessarily equally.",
        "",
        *table_lines(rows),
        "",
        "Notes:",
        "",
    ]
    for row in rows:
        if row.note:
            lines.append(f"- {row.benchmark}, {row.case} vs {row.reference_name}: {row.note}")
    for name, error in failures.items():
        lines.append(f"- {name}: FAILED: {error}")
    lines += ["", METHOD]
    with open(path, "w") as handle:
        handle.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=BENCHMARKS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--toy", action="store_true", help="toy sizes: checks that the code runs")
    parser.add_argument("--out", default=None, help="results file (default bench/results.md; toy runs write none)")
    args = parser.parse_args(argv)

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    rows, failures = [], {}
    for name in args.only:
        began = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            new = run_benchmark(name, args.toy, 1 if args.toy else args.repeats)
        except Exception as error:  # one broken benchmark must not lose the others' numbers
            if args.toy:
                raise
            failures[name] = f"{type(error).__name__}: {error}"
            print(f"   FAILED: {failures[name]}", flush=True)
            continue
        print_rows(new)
        print(f"   ({time.perf_counter() - began:.0f} s)", flush=True)
        rows += new

    import torch

    if torch.cuda.is_available() and not args.toy:
        from bench import gpu

        gpu.main([])
    else:
        print("== gpu: skipped (no CUDA device)")

    seconds = time.perf_counter() - start
    print(f"\n== all ({seconds / 60:.1f} min)")
    print_rows(rows)
    misses = [r for r in rows if verdict(r) == "MISS"]
    for r in misses:
        print(f"MISS: {r.benchmark} {r.case}: {fmt(r.ratio)}x vs target {r.target}x")
    out = args.out or (None if args.toy else REPO_ROOT / "bench" / "results.md")
    if out:
        write_results(out, rows, seconds, (load_start, os.getloadavg()[0]), environment(), failures)
        print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
