"""The tiny recipe chains text and vision pretraining and stages 1-4 through trainer/ into a Hub-layout folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from recipes.tiny import train_default
from trainer.checkpoint import REMOTE_CODE_FILES

HUB_FILES = {
    "config.json", "model.safetensors", "generation_config.json", "chat_template.jinja", "tokenizer.json",
    "tokenizer_config.json", "processor_config.json", "README.md", *REMOTE_CODE_FILES,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    out = train_default.main(["--quick", "--out", str(root / "tiny"), "--work", str(root / "work"), "--keep-work"])
    return out, root / "work"


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_hub_layout(run):
    out, _ = run
    assert HUB_FILES <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_videollama3.Videollama3Qwen2ForCausalLM"
    assert config["auto_map"]["AutoProcessor"] == "processing_videollama3.Videollama3Qwen2Processor"


def test_stages_chain_with_their_own_freezing(run):
    _, work = run
    assert not (work / "llm").exists()  # text pretraining: off in the recipe's plan
    scenes, positions, vis, stills, s1, aligned, s2, s4 = (
        weights(work / name) for name in ("scenes", "positions", "vision", "stills", "stage1", "align", "stage2", "stage4"))
    base = weights(work / "base")
    vision = [k for k in base if ".vision_encoder." in k or ".mm_projector." in k]
    text = [k for k in base if k not in vision]
    # Scene pretraining (mixed, then position questions alone) trains the LLM only, vision
    # pretraining the encoder only, images and then video stills too (the stand-ins for Qwen2.5 and
    # SigLIP); stage 1 keeps the LLM frozen and trains the vision side, and so does the alignment after it.
    for before, after in ((base, scenes), (scenes, positions)):
        assert all(torch.equal(before[k], after[k]) for k in vision)
        assert any(not torch.equal(before[k], after[k]) for k in text)
    for before, after in ((positions, vis), (vis, stills), (stills, s1), (s1, aligned)):
        assert all(torch.equal(before[k], after[k]) for k in text)
        assert any(not torch.equal(before[k], after[k]) for k in vision)
    # Stage 2 starts from the aligned model and trains everything; stage 4 is the packaged model.
    assert any(not torch.equal(aligned[k], s2[k]) for k in text)
    final = weights(run[0])
    assert all(torch.equal(final[k], s4[k]) for k in s4)


def test_plan_turns_on_restated_answers_and_switches_steps_on_and_off(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"curriculum": {"answers": "restated"}, "scenes": {"steps": 0}, "pretrain": {"steps": 2},
                                "positions": {"steps": 0}, "align": {"steps": 0}}))
    work = tmp_path / "work"
    train_default.main(["--quick", "--out", str(tmp_path / "tiny"), "--work", str(work), "--keep-work", "--plan", str(plan)])
    rows = [json.loads(line) for line in (work / "data" / "eval.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "colours" for r in rows)
    assert not any((work / name).exists() for name in ("scenes", "positions", "align"))
    base, llm = weights(work / "base"), weights(work / "llm")
    text = [k for k in base if ".vision_encoder." not in k and ".mm_projector." not in k]
    # Text pretraining trains the LLM alone.
    assert all(torch.equal(base[k], llm[k]) for k in base if k not in text)
    assert any(not torch.equal(base[k], llm[k]) for k in text)


def test_plan_balances_the_projector_and_freezes_stage_2s_vision_side(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"balance": {"images": 8}, "2": {"trainable": ["llm"], "lr": {"llm": 1e-3}}}))
    work = tmp_path / "work"
    train_default.main(["--quick", "--out", str(tmp_path / "tiny"), "--work", str(work), "--keep-work", "--plan", str(plan)])
    stills, balanced, s1, aligned, s2 = (weights(work / name) for name in ("stills", "balance", "stage1", "align", "stage2"))
    # The balancing folds a map into the projector's first linear and changes nothing else.
    assert {k for k in stills if not torch.equal(stills[k], balanced[k])} == {
        "model.mm_projector.readout.0.weight", "model.mm_projector.readout.0.bias"}
    assert any(not torch.equal(balanced[k], s1[k]) for k in balanced)  # stage 1 starts from it
    changed = {k for k in aligned if not torch.equal(aligned[k], s2[k])}  # stage 2 starts from the alignment
    assert changed and not any(".vision_encoder." in k or ".mm_projector." in k for k in changed)


def test_loads_with_auto_classes_and_answers(run):
    from transformers import AutoModelForCausalLM, AutoProcessor

    out, work = run
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    video = sorted((work / "data" / "videos").glob("*.mp4"))[0]
    messages = [{"role": "user", "content": [{"type": "video", "video": str(video)},
                                             {"type": "text", "text": "What appears in the video?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["compression_mask"].sum() < inputs["compression_mask"].numel()  # DiffFP on by default
    output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_images_are_served_at_the_official_merge_size_and_package_can_change_it(run, tmp_path):
    """The packaged processor merges images by 1 (the official processor's default) although stage 4
    trained them at 2; `package` writes another merge size when asked and changes nothing else."""
    from transformers import AutoProcessor

    from trainer.config import STAGES

    out, work = run
    assert STAGES[4]["image_merge_size"] == 2
    remerged = tmp_path / "merged2"
    train_default.package(work / "stage4", remerged, image_merge_size=2)
    image = sorted((work / "data" / "images").glob("*.png"))[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "Hi"}]}]
    merges = []
    for folder in (out, remerged):
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        merges.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                    return_tensors="pt")["merge_sizes"].tolist())
    assert merges == [[1], [2]]
    trained = json.loads((work / "stage4" / "processor_config.json").read_text())
    assert json.loads((out / "processor_config.json").read_text()) == trained
    written = json.loads((remerged / "processor_config.json").read_text())
    assert written.pop("image_merge_size") == 2 and {k: v for k, v in trained.items() if k != "image_merge_size"} == written


def test_embedded_default_carries_the_current_remote_code():
    """`trust_remote_code` runs the copies inside `tiny_model/`; they must not drift from the root.
    After changing a remote-code file, copy it into tiny_model/ (or re-run the recipe)."""
    from tools.local import REPO_ROOT

    for name in ("configuration_videollama3.py", "modeling_videollama3.py", "processing_videollama3.py",
                 "image_processing_videollama3.py", "video_processing_videollama3.py"):
        assert (REPO_ROOT / "tiny_model" / name).read_text() == (REPO_ROOT / name).read_text(), name
    assert (REPO_ROOT / "tiny_model" / "README.md").read_text() == (REPO_ROOT / "model_card.md").read_text()


def test_evaluation_scores_every_held_out_question(run, tmp_path):
    from tools import evaluate_default

    out, _ = run
    result = evaluate_default.evaluate(str(out), images=3, videos=2, data_dir=str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    asked = {}
    for row in rows:
        key = f"{row['modality']}/{row['kind']}"
        asked[key] = asked.get(key, 0) + 1
    assert {key: total for key, (_, total) in result["per_kind"].items()} == asked
    for key, (right, total) in result["per_kind"].items():
        assert 0 <= right <= total
    tokens = result["video_tokens"]
    assert 0 < tokens["kept"] < tokens["total"]
    assert result["scores"]["pruned"] == pytest.approx(1 - tokens["kept"] / tokens["total"])


def test_evaluation_scores_only_what_the_set_asks(run, tmp_path, capsys):
    from tools import evaluate_default

    out, _ = run
    result = evaluate_default.evaluate(str(out), images=0, videos=1, data_dir=str(tmp_path / "videos"))
    assert set(result["scores"]) == {"video", "pruned"}  # no image questions: no image score, not 0%
    evaluate_default.main(["--model", str(out), "--images", "0", "--videos", "1", "--data-dir", str(tmp_path / "videos")])
    printed = capsys.readouterr().out
    assert "image questions exact" not in printed
    assert "(not in this set, so not checked: image)" in printed
    with pytest.raises(ValueError, match=r"eval.jsonl: no held-out questions to answer \(images=0, videos=0\)"):
        evaluate_default.evaluate(str(out), images=0, videos=0, data_dir=str(tmp_path / "empty"))


def test_evaluation_seed_chooses_the_held_out_set(run, tmp_path):
    from recipes.tiny import curriculum
    from tools import evaluate_default

    out, _ = run
    for name, argv in (("seven", ["--seed", "7"]), ("default", [])):
        evaluate_default.main(["--model", str(out), "--images", "2", "--videos", "1", "--data-dir", str(tmp_path / name)] + argv)
    curriculum.generate(tmp_path / "direct", seed=7, images=2, videos=1, texts=0)
    held_out = {name: (tmp_path / name / "eval.jsonl").read_text() for name in ("seven", "default", "direct")}
    assert held_out["seven"] == held_out["direct"] != held_out["default"]


def test_temporal_answers_count_within_one_second():
    from tools.evaluate_default import is_correct

    assert is_correct("when", "2.5-5.0 seconds", "2.0-5.0 seconds")
    assert not is_correct("when", "3.5-5.0 seconds", "2.0-5.0 seconds")
    assert not is_correct("when", "soon", "2.0-5.0 seconds")
    assert is_correct("colour", "red", "red") and not is_correct("colour", "red.", "red")


def test_evaluation_refuses_a_held_out_set_of_the_other_answer_style(tmp_path):
    from recipes.tiny import curriculum
    from tools import evaluate_default

    curriculum.generate(tmp_path, seed=1, images=2, videos=0, texts=0, answers="restated")
    with pytest.raises(ValueError, match="restated answers, but answers='short'"):
        evaluate_default.evaluate(str(tmp_path / "no-model"), data_dir=str(tmp_path), answers="short")


def test_plan_sets_the_model_shape_and_the_scene_readout(tmp_path, monkeypatch):
    from recipes.tiny import vision_pretrain

    calls, aligned = [], {}
    pretrain, align = vision_pretrain.pretrain_vision, vision_pretrain.align_projector

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return pretrain(*args, **kwargs)

    def recording_align(*args, **kwargs):
        aligned.update(kwargs)
        return align(*args, **kwargs)

    monkeypatch.setattr(vision_pretrain, "pretrain_vision", recording)
    monkeypatch.setattr(vision_pretrain, "align_projector", recording_align)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model": {"num_key_value_heads": 4, "vision_layers": 1}, "vision": {"scene_weight": 1.0}}))
    out = train_default.main(["--quick", "--out", str(tmp_path / "tiny"), "--plan", str(plan)])
    seen, stills = calls  # the vision step, then the second pass with video stills
    assert seen["scene_weight"] == 1.0 and seen["steps"] == train_default.QUICK["vision"]["steps"]
    assert stills["scene_weight"] == 0.0 and stills["frame_weight"] == train_default.FULL["stills"]["frame_weight"] > 0
    # The quick run keeps the full plan's background head and merged-token alignment.
    assert seen["background_weight"] == train_default.FULL["vision"]["background_weight"] > 0
    assert aligned["merged_weight"] == train_default.FULL["align"]["merged_weight"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 4 and config["vision_encoder_config"]["num_hidden_layers"] == 1
    assert train_default.MODEL["num_key_value_heads"] == 2  # the default shape is not mutated
