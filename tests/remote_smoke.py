"""Remote-code smoke run: a checkpoint through the Auto classes, one image, one video, one generate.

    python -m tests.remote_smoke tiny_model [--layout ours|official|snapshot|all]

Prints one JSON line (prompt ids, visual inputs, generated ids, versions). `official` first rewrites
a copy of the folder's processor files the way official Hub checkpoints lay them out; `snapshot`
places a copy in a Hub cache (`models--org--name/snapshots/<commit>/`) and loads it by repo id
offline, which is how the Hub loader sees a downloaded checkpoint. Run it in a fresh process with
a fresh `HF_MODULES_CACHE` so that no earlier module copy can make it pass.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.official_files import OFFICIAL_PREPROCESSOR_CONFIG, OFFICIAL_STYLE_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
MEDIA = ROOT / "examples" / "media"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LAYOUTS = ("ours", "official", "snapshot")


def official_layout(folder: Path) -> Path:
    """Rewrite `folder`'s processor files as an official checkpoint has them (preprocessor_config.json,
    flat processor_config.json, chat_template.json without generation markers)."""
    processor = json.loads((folder / "processor_config.json").read_text())
    image = dict(OFFICIAL_PREPROCESSOR_CONFIG, **{k: processor["image_processor"][k] for k in ("min_tokens", "max_tokens")})
    (folder / "preprocessor_config.json").write_text(json.dumps(image))
    flat = {k: processor[k] for k in ("fps", "max_frames", "image_merge_size", "video_merge_size")}
    flat.update(auto_map={"AutoProcessor": "processing_videollama3.Videollama3Qwen2Processor"},
                processor_class="Videollama3Qwen2Processor")
    (folder / "processor_config.json").write_text(json.dumps(flat))
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": OFFICIAL_STYLE_TEMPLATE}))
    return folder


def snapshot_layout(folder: Path, cache: Path, repo_id: str = "videollama3/tiny") -> str:
    """Copy `folder` into a Hub cache at `cache` as commit `COMMIT` of `repo_id`; return the repo id."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo_id


CONVERSATION = [{"role": "user", "content": [
    {"type": "image", "image": str(MEDIA / "shapes.png")},
    {"type": "video", "video": str(MEDIA / "shapes.mp4")},
    {"type": "text", "text": "What appears in the video?"},
]}]


def checkout_modules() -> list[str]:
    """Modules of this checkout, besides this script's own imports, and of pytest that this process has loaded."""
    own = {"tests", "tests.official_files"}
    return sorted(name for name in sys.modules if name not in own and (
        name.split(".")[0] in ("tests", "tools", "trainer", "examples", "videollama3_local", "pytest", "_pytest")
        or name.split(".")[0].endswith("_videollama3")))


def run(source: str) -> dict:
    loaded_before = checkout_modules()  # must be none: the Auto classes alone load the checkpoint's code
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
    inputs = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return {
        "input_ids": inputs["input_ids"][0].tolist(),
        "grid_sizes": inputs["grid_sizes"].tolist(),
        "kept_tokens": int(inputs["compression_mask"].sum()),
        "pixel_sum": float(inputs["pixel_values"].double().sum()),
        "generated": generated[0, inputs["input_ids"].shape[1]:].tolist(),
        "processor_module": type(processor).__module__,
        "transformers": transformers.__version__,
        "torchvision_imported": any(name.split(".")[0] == "torchvision" for name in sys.modules),
        "loaded_before": loaded_before,
    }


def in_fresh_process(folder, layout: str, modules) -> dict:
    """`run` on `folder` in `layout`, in a fresh process whose module cache `modules` holds nothing yet;
    returns its outputs, or raises RuntimeError with the end of its stderr."""
    env = dict(os.environ, HF_MODULES_CACHE=str(modules),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "tests.remote_smoke", str(Path(folder).resolve()), "--layout", layout],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise RuntimeError(f"remote-code smoke, layout {layout}: failed\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def all_layouts(folder: str) -> int:
    """Each layout in a fresh process with a fresh module cache; they must agree on every output."""
    results = {}
    for layout in LAYOUTS:
        with tempfile.TemporaryDirectory() as modules:
            try:
                results[layout] = in_fresh_process(folder, layout, modules)
            except RuntimeError as error:
                print(error, file=sys.stderr)
                return 1
    keys = ("input_ids", "grid_sizes", "kept_tokens", "pixel_sum", "generated")
    first = results["ours"]
    disagree = [f"{layout} {key}" for layout, out in results.items() for key in keys if out[key] != first[key]]
    disagree += [f"{layout} imported torchvision" for layout, out in results.items() if out["torchvision_imported"]]
    disagree += [f"{layout} had {out['loaded_before']} loaded before the Auto classes"
                 for layout, out in results.items() if out["loaded_before"]]
    print(f"remote-code smoke, transformers {first['transformers']}: layouts {', '.join(LAYOUTS)} "
          + (f"disagree: {disagree}" if disagree else f"agree ({len(first['input_ids'])} prompt tokens, "
             f"{first['kept_tokens']} visual tokens kept, generated {first['generated']})"))
    return 1 if disagree else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="a checkpoint folder in this repository's layout, e.g. tiny_model")
    parser.add_argument("--layout", choices=LAYOUTS + ("all",), default="ours",
                        help="'all': each layout in its own fresh process, which must all agree")
    args = parser.parse_args(argv)
    if args.layout == "all":
        return all_layouts(args.folder)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "checkpoint"
        shutil.copytree(args.folder, folder)
        source = str(folder)
        if args.layout == "official":
            official_layout(folder)
        elif args.layout == "snapshot":  # before huggingface_hub is imported, which reads these once
            os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(Path(scratch) / "hub"))
            source = snapshot_layout(folder, Path(scratch) / "hub")
        print(json.dumps(run(source)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
