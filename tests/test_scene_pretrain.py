"""Symbolic scenes (`recipes.tiny.scene_pretrain`): grid tokens, labels, the embedding sums the LLM sees, and training on them."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from recipes.tiny import curriculum, scene_pretrain
from recipes.tiny.studies import binding_study
from tools.local import REPO_ROOT, remote_module

IP = remote_module("image_processing_videollama3")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REPO_ROOT / "tiny_model", trust_remote_code=True)


def test_scene_grid_holds_each_shape_in_its_quadrant(tokenizer):
    study = scene_pretrain.SceneConfig(objects=2, kinds=("colour",), turns=2)
    writer = scene_pretrain.SceneWriter(tokenizer, study)
    scene = writer(np.random.default_rng(3), study.turns)
    text = tokenizer.decode([t for t, label in zip(scene.ids, scene.labels) if label != -100])
    answers = [a.strip() for a in text.split("<|im_end|>") if a.strip()]
    assert scene.shapes == 2 and scene.kind == "colour" and len(answers) == 2
    grid = [tokenizer.decode([i for i in cell if i != writer.pad]).split() for cell in scene.cells]
    shapes = {tuple(cell) for cell in grid if len(cell) > 1}
    assert len(shapes) == 2
    for colour, kind, vertical, horizontal in shapes:
        quadrant = curriculum.QUADRANTS.index(f"{vertical} {horizontal}")
        top, left = 3 * (quadrant // 2), 3 * (quadrant % 2)
        block = [grid[r * 6 + c] for r in range(top, top + 3) for c in range(left, left + 3)]
        assert all(cell == [colour, kind, vertical, horizontal] for cell in block)
    assert sorted(answers) == sorted(colour for colour, *_ in shapes)  # both colour questions, one per shape
    background = [cell for cell in grid if len(cell) == 1]
    assert len(background) == 36 - 18 and len({cell[0] for cell in background}) == 1
    assert background[0][0] in curriculum.BACKGROUNDS
    assert scene.slots == list(range(scene.slots[0], scene.slots[0] + 36))
    assert [scene.ids[i] for i in scene.slots] == [writer.pad] * 36


def test_grid_tokens_are_sums_of_word_embeddings(tokenizer):
    # An image scene and a video scene in one batch: grids of different sizes at different places.
    image = scene_pretrain.SceneWriter(tokenizer, scene_pretrain.SceneConfig(objects=1, kinds=("shape",), turns=1))
    video = scene_pretrain.SceneWriter(tokenizer, scene_pretrain.SceneConfig(kinds=("when", "appear"), videos=1.0, turns=1))
    scenes = [image(np.random.default_rng(0), 1), video(np.random.default_rng(1), 1)]
    assert len(scenes[0].cells) == 36 and len(scenes[1].cells) > 16
    embeddings = torch.nn.Embedding(len(tokenizer), 8)
    embeds, labels, mask = scene_pretrain.embed_batch(scenes, embeddings, image.pad, 0.0, torch.Generator())
    for b, scene in enumerate(scenes):
        for slot, cell in zip(scene.slots, scene.cells):
            words = torch.tensor([i for i in cell if i != image.pad])
            assert torch.allclose(embeds[b, slot], embeddings(words).sum(0))
        rest = [i for i in range(len(scene.ids)) if i not in set(scene.slots)]
        assert torch.equal(embeds[b, rest], embeddings(torch.tensor([scene.ids[i] for i in rest])))
        assert int(mask[b].sum()) == len(scene.ids)
        assert labels[b, len(scene.ids):].eq(-100).all()


def test_video_scene_is_laid_out_as_the_processor_lays_out_a_video(tokenizer):
    writer = scene_pretrain.SceneWriter(tokenizer, scene_pretrain.SceneConfig(kinds=scene_pretrain.VIDEO_KINDS, videos=1.0, turns=2))
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    kinds = set()
    for seed in range(12):
        scene = writer(np.random.default_rng(seed), 2)
        ids = [image_token if i in set(scene.slots) else t for i, t in enumerate(scene.ids)]
        text = tokenizer.decode(ids)
        # The processor's rendering (`Time 0.0s:<image>...,Time 1.0s:<image>...`) tokenises to these ids.
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        frames = text.split("\n")[1].split(",")
        assert [f.split(":")[0] for f in frames] == [f"Time {s}.0s" for s in range(len(frames))]
        assert frames[0].count("<image>") == 16 and all(f.count("<image>") >= 1 for f in frames)
        assert 6 <= len(frames) <= 8 and sum(f.count("<image>") for f in frames) == len(scene.cells)
        answers = [t for t, label in zip(scene.ids, scene.labels) if label != -100]
        assert tokenizer.decode(answers).count("<|im_end|>") == 2
        kinds.add(scene.kind)
    assert kinds == set(scene_pretrain.VIDEO_KINDS)


def test_clip_tokens_keep_what_the_differential_frame_pruner_keeps():
    """The symbolic clip keeps, frame by frame, the very tokens DiffFP keeps of the curriculum's
    rendered clip of the same event, and names the actor where it is drawn."""
    frames_checked = 0
    for seed in range(25):
        frames, event = curriculum.make_video(np.random.default_rng(seed))
        sampled = frames[:: curriculum.VIDEO_FPS]  # (T, 112, 112, 3): one frame a second
        patches = IP.Videollama3ImageProcessor().to_patches(sampled, 2)
        keep = remote_module("video_processing_videollama3").differential_frame_pruning(patches, (len(sampled), 8, 8), 2, 0.1, 1).view(len(sampled), 16)
        clip = scene_pretrain.clip_tokens(event, "plain", len(sampled))
        assert [kept for kept, _ in clip] == [torch.nonzero(k).flatten().tolist() for k in keep]
        for second, (kept, words) in enumerate(clip):
            shown = curriculum.actor_centre(event, second * curriculum.VIDEO_FPS, len(frames)) is not None
            named = [b for b, w in enumerate(words) if w[:2] == [event["shape"].colour, event["shape"].kind]]
            assert bool(named) == shown
            frames_checked += 1
    assert frames_checked > 100


def test_run_reports_held_out_accuracy_per_kind_and_shape_count(tokenizer):
    study = scene_pretrain.SceneConfig(objects=2, kinds=("colour", "count"), steps=2, batch=4, eval_scenes=20, every=2, warmup_steps=1)
    curve = binding_study.run(study, tokenizer, heads=4)
    assert [step for step, _ in curve] == [0, 2]
    assert set(curve[-1][1]) == {"colour", "colour2", "count"}
    assert all(0.0 <= value <= 1.0 for value in curve[-1][1].values())


def test_llm_shape_takes_heads_layers_and_width(tokenizer):
    from recipes.tiny import train_default

    model = binding_study.build_llm(tokenizer, heads=8, init=None, layers=5, width=64)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 4
    assert model.config.hidden_size == 64 and model.model.layers[0].mlp.up_proj.out_features == 256
    assert model.get_input_embeddings().weight.shape[1] == 64
    default = binding_study.build_llm(tokenizer, heads=4, init=None)
    assert default.config.num_hidden_layers == train_default.MODEL["num_hidden_layers"]
    assert default.config.hidden_size == train_default.MODEL["hidden_size"]


def test_pretrain_llm_trains_only_the_llm_and_is_deterministic(tokenizer):
    from recipes.tiny import train_default

    study = scene_pretrain.SceneConfig(steps=3, batch=2, lr=1e-3, eval_scenes=6, every=3, seed=5)
    runs = []
    for _ in range(2):
        model = train_default.build_model(tokenizer)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        curve = scene_pretrain.pretrain_llm(model, tokenizer, study)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and not any("vision_encoder" in k or "mm_projector" in k for k in changed)
        assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
        assert all(p.requires_grad for p in model.parameters())  # flags handed back as they came
        assert [step for step, _ in curve] == [0, 3]
        runs.append(after)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_mixed_run_reports_image_and_video_kinds(tokenizer):
    study = scene_pretrain.SceneConfig(kinds=("position", "when"), videos=0.5, steps=2, batch=4, eval_scenes=30, every=2)
    curve = binding_study.run(study, tokenizer, heads=4)
    assert {"position", "when"} <= set(curve[-1][1])


@pytest.mark.parametrize("kinds, videos, match", [
    (("colour",), 0.5, "video scenes need one of"),
    (("when",), 0.5, "image scenes need one of"),
    (("when",), 1.5, "videos=1.5: the share of video scenes must be within"),
])
def test_pretrain_llm_refuses_kinds_the_scenes_cannot_ask(tokenizer, kinds, videos, match):
    from recipes.tiny import train_default

    study = scene_pretrain.SceneConfig(kinds=kinds, videos=videos)
    with pytest.raises(ValueError, match=match):
        scene_pretrain.pretrain_llm(train_default.build_model(tokenizer), tokenizer, study)


@pytest.mark.parametrize("field, value", [("steps", -1), ("batch", 0), ("turns", 0)])
def test_pretrain_llm_refuses_bad_sizes(tokenizer, field, value):
    from recipes.tiny import train_default

    study = scene_pretrain.SceneConfig(**{field: value})
    with pytest.raises(ValueError, match=f"{field}={value}"):
        scene_pretrain.pretrain_llm(train_default.build_model(tokenizer), tokenizer, study)
