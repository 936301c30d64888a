"""Benchmark 3: peak memory of the vision forward (sdpa, no grad) as the frame count grows.

Method: every (implementation, frame count) runs in a fresh Python subprocess. After building the
model and its inputs, the worker resets the kernel's peak-RSS counter (`echo 5 >
/proc/self/clear_refs` resets `VmHWM`), records `VmRSS` as the baseline, runs one forward and
reads `VmHWM`: peak minus baseline is the memory the forward itself needed. glibc is told to
serve every allocation above 64 KiB with mmap (`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave
the process at once and RSS tracks live tensors instead of allocator caches.

The unchunked activation bound is what any forward over all N patches at once must hold in its
widest step, the MLP: the residual stream (N x D), the fc1 output (N x I, GELU applied in place)
and the fc2 output (N x D), in fp32: `N * (2*D + I) * 4` bytes. Weights and inputs are in the
baseline. Our CPU inference stays below it: it takes groups of whole frames through all layers
(`INFERENCE_GROUP_TOKENS`), so only the residual stream grows with N.
"""

import gc
import json
import os
import subprocess
import sys

from bench.common import REPO_ROOT, Row, Stat
from bench.vision import VisionSpec, build_pair, forward_fns, inputs

MIB = 1 << 20
FULL = VisionSpec(layers=1)  # peak memory is one layer's activations; more layers add only weights
TOY = VisionSpec(hidden=64, heads=4, mlp=128, layers=1, grid_h=4, grid_w=6)
FRAMES = (16, 64, 180)
TOY_FRAMES = (1, 2, 4)


def lower_bound_mib(spec: VisionSpec, frames: int) -> float:
    patches = frames * spec.grid_h * spec.grid_w
    return patches * (2 * spec.hidden + spec.mlp) * 4 / MIB


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(impl: str, frames: int, spec: VisionSpec) -> dict:
    """Peak RSS growth (MiB) of one forward of `impl` ("ours" or "native") in this process."""
    import torch

    both = forward_fns(*build_pair(spec), *inputs(spec, frames))
    forward = both[0] if impl == "ours" else both[1]
    del both  # the other model's closure goes, and with it the other model
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    baseline = _status_mib("VmRSS")
    out = forward()
    peak = _status_mib("VmHWM")
    return {"impl": impl, "frames": frames, "baseline_mib": baseline, "peak_mib": peak, "forward_mib": peak - baseline,
            "output": list(out.shape), "threads": torch.get_num_threads()}


def measure_in_subprocess(impl: str, frames: int, spec: VisionSpec) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO_ROOT))
    args = [sys.executable, "-m", "bench.memory", impl, str(frames), json.dumps(spec.__dict__)]
    done = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {impl} {frames} frames failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def growth_per_frame(points: dict[int, float]) -> tuple[float, float]:
    """MiB per added frame over the first and over the last step of the frame counts."""
    f = sorted(points)
    first = (points[f[1]] - points[f[0]]) / (f[1] - f[0])
    last = (points[f[-1]] - points[f[-2]]) / (f[-1] - f[-2])
    return first, last


def run(spec: VisionSpec = FULL, frame_counts=FRAMES, in_subprocess: bool = True) -> list[Row]:
    measure_fn = measure_in_subprocess if in_subprocess else measure
    results = {impl: {f: measure_fn(impl, f, spec)["forward_mib"] for f in frame_counts} for impl in ("ours", "native")}
    rows = []
    for f in frame_counts:
        bound = lower_bound_mib(spec, f)
        case = f"{f} frames x {spec.grid_h * spec.grid_w} patches, {spec.layers} layer(s)"
        rows.append(Row("3 vision peak memory", case, "MiB", Stat([results["ours"][f]]), Stat([results["native"][f]]), "native"))
        rows.append(Row("3 vision peak memory", case, "MiB", Stat([results["ours"][f]]), Stat([bound]), "unchunked activation bound"))
    # Linear growth: the last step's MiB per added frame is at most 1.25x the first step's.
    f = sorted(frame_counts)
    case = f"MiB/frame, {f[-2]}->{f[-1]} vs {f[0]}->{f[1]} frames"
    for impl in ("ours", "native"):
        first, last = growth_per_frame(results[impl])
        rows.append(Row("3 vision peak memory", f"{impl}: {case}", "MiB/frame", Stat([last]), Stat([first]),
                        "own first step", "<= 1.25" if impl == "ours" else None))
    return rows


if __name__ == "__main__":
    impl, frames, spec = sys.argv[1], int(sys.argv[2]), VisionSpec(**json.loads(sys.argv[3]))
    print(json.dumps(measure(impl, frames, spec)))
