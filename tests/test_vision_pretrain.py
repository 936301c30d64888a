"""Dense patch labels of the vision pretraining (the SigLIP stand-in of the tiny recipe)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from recipes.tiny import curriculum, vision_pretrain


def scene():
    canvas = np.full((84, 84, 3), 120, dtype=np.uint8)
    canvas[14:42, 42:70] = curriculum.COLOURS["red"]  # patches (1, 3), (1, 4), (2, 3), (2, 4)
    canvas[70:84, 0:5] = curriculum.COLOURS["blue"]  # 70 of 196 pixels of patch (5, 0): 36%
    canvas[0:14, 0:2] = curriculum.COLOURS["green"]  # 28 of 196 pixels of patch (0, 0): 14%
    return canvas


def test_patch_labels_name_colour_shape_and_position():
    labels = vision_pretrain.patch_labels(scene(), {"red": "square", "blue": "circle", "green": "triangle"}, patch=14)
    colour = labels.colour.view(6, 6)
    shape = labels.shape.view(6, 6)
    red = list(curriculum.COLOURS).index("red") + 1
    blue = list(curriculum.COLOURS).index("blue") + 1
    expected = torch.zeros(6, 6, dtype=torch.long)
    expected[1:3, 3:5] = red
    expected[5, 0] = blue
    assert torch.equal(colour, expected)  # the green sliver covers less than COVER_PIXELS
    assert shape[1, 3] == curriculum.SHAPES.index("square") + 1
    assert shape[5, 0] == curriculum.SHAPES.index("circle") + 1
    assert int((shape > 0).sum()) == 5
    position = labels.position.view(6, 6, 2)
    assert torch.equal(position[0, 0], torch.tensor([0.0, 0.0]))
    assert torch.equal(position[5, 0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(position[2, 4], torch.tensor([0.4, 0.8]))


def test_palette_index_and_block_counts_match_their_pixel_by_pixel_definition():
    """Per pixel: 1 + the index of the palette colour it equals exactly, else 0 (near-palette pixels
    included); per block: how many pixels of each colour, as a pixel loop counts them."""
    rng = np.random.default_rng(0)
    palette = np.array(list(curriculum.COLOURS.values()), dtype=np.uint8)  # (C, 3)
    pixels = rng.integers(0, 256, (42, 70, 3), dtype=np.uint8)
    painted = rng.random((42, 70)) < 0.5
    pixels[painted] = palette[rng.integers(0, len(palette), painted.sum())]
    near = rng.random((42, 70)) < 0.1  # one channel off by one: not a palette colour
    pixels[near, 1] ^= 1
    index = vision_pretrain.palette_index(pixels)
    expected = np.zeros((42, 70), dtype=np.int64)
    for r in range(42):
        for c in range(70):
            hits = [i for i, colour in enumerate(palette) if (pixels[r, c] == colour).all()]
            expected[r, c] = hits[0] + 1 if hits else 0
    assert np.array_equal(index, expected) and 0 < (index > 0).mean() < 1
    counts = vision_pretrain.block_counts(index, 14)  # (3 x 5 blocks, C)
    assert counts.shape == (15, len(palette)) and counts.dtype == np.float64
    for block in range(15):
        r, c = divmod(block, 5)
        patch = index[14 * r:14 * r + 14, 14 * c:14 * c + 14]
        assert counts[block].tolist() == [float((patch == i + 1).sum()) for i in range(len(palette))]


def test_object_loss_pools_each_shape_of_each_image():
    head = vision_pretrain.PatchHead(8)
    labels = vision_pretrain.patch_labels(scene(), {"red": "square", "blue": "circle", "green": "triangle"}, patch=14)
    features = torch.randn(36, 8, requires_grad=True)
    loss, metrics = head.loss(features, labels, torch.zeros(36, dtype=torch.long))
    loss.backward()
    assert features.grad.abs().sum(1).gt(0).all()
    assert set(metrics) == {"colour", "shape_of_patch", "shape_of_object"}  # the style is off by default


def test_background_style_is_read_from_the_background_patches_of_each_image():
    head = vision_pretrain.PatchHead(8, background_weight=1.0)
    labels = vision_pretrain.patch_labels(scene(), {"red": "square", "blue": "circle", "green": "triangle"}, patch=14)
    for module in (head.colour, head.shape, head.position):
        module.requires_grad_(False).weight.zero_()
        module.bias.zero_()
    two = vision_pretrain.PatchLabels(*(torch.cat([getattr(labels, f)] * 2) for f in ("colour", "shape", "position")))
    features = torch.randn(72, 8, requires_grad=True)
    loss, metrics = head.loss(features, two, torch.arange(2).repeat_interleave(36), torch.tensor([0, 3]))
    assert "background" in metrics
    with pytest.raises(ValueError, match="backgrounds: needed when background_weight"):
        head.loss(features, two, torch.arange(2).repeat_interleave(36))
    loss.backward()
    shape_patches = two.colour > 0
    assert features.grad[~shape_patches].abs().sum(1).gt(0).all()  # every background patch of both images
    # with the per-patch and per-shape read-outs zeroed, only the style reaches any patch
    assert torch.equal(features.grad[shape_patches], torch.zeros(int(shape_patches.sum()), 8))


def test_scene_labels_bind_each_colour_kind_and_quadrant():
    row = {"objects": [{"colour": "red", "shape": "square", "quadrant": "top right"},
                       {"colour": "blue", "shape": "circle", "quadrant": "bottom left"}], "background": "striped"}
    names = [name for name, _ in vision_pretrain.SCENE_SLOTS]
    labels = dict(zip(names, vision_pretrain.scene_labels(row).tolist()))
    colour = {c: i + 1 for i, c in enumerate(curriculum.COLOURS)}
    kind = {k: i + 1 for i, k in enumerate(curriculum.SHAPES)}
    quadrant = {q: i + 1 for i, q in enumerate(curriculum.QUADRANTS)}
    assert labels["colour of square"] == colour["red"] and labels["colour of circle"] == colour["blue"]
    assert labels["colour of triangle"] == 0  # not in the scene
    assert labels["kind of red"] == kind["square"] and labels["kind of green"] == 0
    assert labels["quadrant of blue"] == quadrant["bottom left"] and labels["quadrant of yellow"] == 0
    assert labels["colour at top right"] == colour["red"] and labels["colour at top left"] == 0
    assert labels["kind at bottom left"] == kind["circle"] and labels["kind at bottom right"] == 0
    assert labels["background"] == curriculum.BACKGROUNDS.index("striped") and labels["count"] == 2
    assert len(labels) == len(vision_pretrain.SCENE_SLOTS)


def test_scene_loss_gives_every_patch_its_own_images_scene():
    torch.manual_seed(0)
    plain = vision_pretrain.PatchHead(8)
    torch.manual_seed(0)
    head = vision_pretrain.PatchHead(8, scene_weight=1.0)  # the same read-outs, the scene's created last
    labels = vision_pretrain.patch_labels(scene(), {"red": "square", "blue": "circle", "green": "triangle"}, patch=14)
    two = vision_pretrain.PatchLabels(*(torch.cat([getattr(labels, f)] * 2) for f in ("colour", "shape", "position")))
    rows = [{"objects": [{"colour": "red", "shape": "square", "quadrant": "top right"}], "background": "plain"},
            {"objects": [{"colour": "blue", "shape": "circle", "quadrant": "bottom left"}], "background": "noisy"}]
    scenes = torch.stack([vision_pretrain.scene_labels(r) for r in rows])  # (2, S)
    image_of_patch = torch.arange(2).repeat_interleave(36)
    features = torch.randn(72, 8)
    loss, metrics = head.loss(features, two, image_of_patch, scenes=scenes)
    rest, _ = plain.loss(features, two, image_of_patch)
    with pytest.raises(ValueError, match="scenes: needed when scene_weight"):
        head.loss(features, two, image_of_patch)
    # The scene term computed patch by patch and slot by slot, against each patch's own image.
    logits = head.scene(features)
    expected, first = [], 0
    for i, (_, classes) in enumerate(vision_pretrain.SCENE_SLOTS):
        slot = logits[:, first:first + classes]
        expected.append(torch.stack([F.cross_entropy(slot[n], scenes[n // 36, i]) for n in range(72)]).mean())
        first += classes
    assert torch.allclose(loss - rest, torch.stack(expected).mean(), atol=1e-6)
    assert {"scene", "scene_all"} <= set(metrics) and "scene" not in plain.loss(features, two, image_of_patch)[1]


def test_word_targets_sum_the_embeddings_of_what_covers_each_patch():
    labels = vision_pretrain.patch_labels(scene(), {"red": "square", "blue": "circle", "green": "triangle"}, patch=14)
    row = {"objects": [{"colour": "red", "shape": "square", "quadrant": "top right"},
                       {"colour": "blue", "shape": "circle", "quadrant": "bottom left"}], "background": "striped"}
    words = [*curriculum.COLOURS, *curriculum.SHAPES, "top", "bottom", "left", "right", *curriculum.BACKGROUNDS]
    table = dict(zip(words, torch.randn(len(words), 4)))

    def embed(text):
        return sum(table[w] for w in text.split())

    targets = vision_pretrain.word_targets(row, labels, embed).view(6, 6, 4)
    red_square = table["red"] + table["square"] + table["top"] + table["right"]
    assert all(torch.allclose(targets[r, c], red_square) for r in (1, 2) for c in (3, 4))
    assert torch.allclose(targets[5, 0], table["blue"] + table["circle"] + table["bottom"] + table["left"])
    assert torch.allclose(targets[0, 0], table["striped"])  # the green sliver is background
    assert torch.allclose(targets[3, 3], table["striped"])


def test_alignment_pulls_visual_tokens_towards_the_words_and_leaves_the_llm(tmp_path):
    from recipes.tiny import train_default

    paths = curriculum.generate(tmp_path, seed=5, images=8, videos=0, texts=2)
    tokenizer = train_default.build_tokenizer(curriculum.corpus_text(paths))
    model = train_default.build_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = vision_pretrain.align_projector(model, train_default.build_processor(tokenizer), paths["vision"], tmp_path,
                                             steps=40, batch=4, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("mm_projector" in k for k in changed) and any("vision_encoder" in k for k in changed)
    assert all("mm_projector" in k or "vision_encoder" in k for k in changed)


def test_merge_blocks_is_the_encoders_own_merge_of_video_frames(tmp_path):
    from PIL import Image

    from recipes.tiny import train_default

    paths = curriculum.generate(tmp_path, seed=5, images=2, videos=0, texts=2)
    tokenizer = train_default.build_tokenizer(curriculum.corpus_text(paths))
    model, processor = train_default.build_model(tokenizer), train_default.build_processor(tokenizer)
    encoder = model.model.vision_encoder.eval()
    frame = np.pad(scene(), ((0, 28), (0, 28), (0, 0)), constant_values=120)  # 112 px, a video frame's size
    images = [Image.fromarray(frame), Image.fromarray(np.ascontiguousarray(frame[:, ::-1]))]
    with torch.no_grad():
        single = processor.image_processor(images, merge_size=1, return_tensors="pt")
        double = processor.image_processor(images, merge_size=2, return_tensors="pt")
        per_patch = encoder(single["pixel_values"], single["grid_sizes"], single["merge_sizes"])
        merged = encoder(double["pixel_values"], double["grid_sizes"], double["merge_sizes"])
    grids = [tuple(g) for g in single["grid_sizes"].tolist()]
    assert grids == [tuple(g) for g in double["grid_sizes"].tolist()] == [(1, 8, 8)] * 2
    torch.testing.assert_close(vision_pretrain.merge_blocks(per_patch, grids), merged, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="even number of patch rows"):
        vision_pretrain.merge_blocks(torch.zeros(9, 4), [(1, 3, 3)])


def weighted_runs(tmp_path, train, weight_name: str, steps: int, generate: dict, **options) -> dict[float, list[float]]:
    """`train`'s (`align_projector`, `pretrain_vision`) loss curves with `weight_name` at 0 and 1,
    each from the same fresh model, on a curriculum written with `generate`."""
    from recipes.tiny import train_default

    paths = curriculum.generate(tmp_path, seed=5, images=8, texts=2, **generate)
    tokenizer = train_default.build_tokenizer(curriculum.corpus_text(paths))
    processor = train_default.build_processor(tokenizer)
    return {weight: train(train_default.build_model(tokenizer), processor, paths["vision"], tmp_path, steps=steps,
                          batch=4, lr=3e-3, **{weight_name: weight}, **options)
            for weight in (0.0, 1.0)}


def test_alignment_of_merged_tokens_adds_their_error_to_the_loss(tmp_path):
    runs = weighted_runs(tmp_path, vision_pretrain.align_projector, "merged_weight", 6, dict(videos=0))
    assert runs[0.0][0] < runs[1.0][0]  # the merged tokens' error is added to the same first batch
    assert runs[0.0] != runs[1.0]


def attribute_features(patches=3000, width=32, seed=0):
    """Patch features where colour is loud, kind quiet and the quadrant quieter, plus noise; and
    their `balance_map` classes (a quarter of the patches are background, with a style)."""
    g = torch.Generator().manual_seed(seed)
    n = vision_pretrain.BALANCE_SLOTS
    colour = torch.randint(1, n["colour"] + 1, (patches,), generator=g)
    kind = torch.randint(1, n["kind"] + 1, (patches,), generator=g)
    quadrant = torch.randint(1, n["quadrant"] + 1, (patches,), generator=g)
    style = torch.randint(1, n["background"] + 1, (patches,), generator=g)
    background = torch.rand(patches, generator=g) < 0.25
    colour, kind = colour.masked_fill(background, 0), kind.masked_fill(background, 0)
    style = style.masked_fill(~background, 0)
    codes = {name: torch.randn(size + 1, width, generator=g) for name, size in n.items()}
    x = (5.0 * codes["colour"][colour] + 0.7 * codes["kind"][kind] + 0.3 * codes["quadrant"][quadrant]
         + 0.7 * codes["background"][style] + 0.5 * torch.randn(patches, width, generator=g))
    return x, torch.stack([colour, kind, quadrant, style], 1)


def test_balance_map_gives_each_attribute_a_like_share_of_the_variance():
    x, classes = attribute_features()
    fold, mu, report = vision_pretrain.balance_map(x, classes, residual=0.0)
    before, after = report["shares_before"], report["shares_after"]
    assert before["colour"] > 0.9 and before["quadrant"] < 0.01  # the loud attribute drowns the others
    assert all(0.1 < after[name] < 0.5 for name in ("colour", "kind", "quadrant"))
    assert all(accuracy > 0.8 for accuracy in report["readout"].values())
    mapped = (x.double() - mu) @ fold.T
    assert torch.allclose(mapped.var(0).sum(), (x.double() - mu).var(0).sum())  # the total variance is kept
    assert torch.equal(vision_pretrain.balance_map(x, classes, residual=0.0)[0], fold)  # deterministic (fixed codes)
    # The residual keeps part of the raw features (here loud in colour: one unit of the centred
    # features weighs against one of the one-hot codes, so the residual depends on their scale).
    mixed = vision_pretrain.balance_map(x, classes, residual=0.2)[2]["shares_after"]
    assert after["colour"] < mixed["colour"] < before["colour"]


def test_balance_map_refuses_a_negative_residual_and_too_narrow_features():
    x, classes = attribute_features(patches=50)
    with pytest.raises(ValueError, match="residual=-0.1"):
        vision_pretrain.balance_map(x, classes, residual=-0.1)
    with pytest.raises(ValueError, match="width 8: need at least 16"):
        vision_pretrain.balance_map(x[:, :8], classes, residual=0.2)


def test_folding_makes_the_projector_read_the_balanced_features():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    old = torch.nn.Linear(32, 24)
    old.load_state_dict(linear.state_dict())
    x, classes = attribute_features()
    fold, mu, _ = vision_pretrain.balance_map(x, classes, residual=0.2)
    vision_pretrain.fold_into_linear(linear, fold, mu)
    probe = torch.randn(10, 32)
    balanced = ((probe.double() - mu) @ fold.T + mu).float()
    assert torch.allclose(linear(probe), old(balanced), atol=1e-4)
    assert not torch.allclose(linear(probe), old(probe), atol=1e-2)


def test_shifted_images_move_their_shapes_whole_and_the_labels_with_them():
    from types import SimpleNamespace

    from tools.local import remote_module

    processor = SimpleNamespace(image_processor=remote_module("image_processing_videollama3").Videollama3ImageProcessor())
    ramp = np.arange(84, dtype=np.uint8)
    pixels = np.stack([np.add.outer(ramp, ramp) % 97, np.tile(ramp, (84, 1)), np.tile(ramp[:, None], (1, 84))], -1)
    pixels[20:41, 30:51] = curriculum.COLOURS["red"]  # a square 20-40 px down, 30-50 px across
    index = vision_pretrain.palette_index(pixels)
    assert vision_pretrain.shift_bounds(index, 7) == (-7, 7, -7, 7)
    assert vision_pretrain.shift_bounds(index, 40) == (-20, 40, -30, 33)
    assert vision_pretrain.shift_bounds(np.zeros((84, 84), dtype=int), 5) == (-5, 5, -5, 5)
    row = {"objects": [{"colour": "red", "shape": "square", "quadrant": "top left"}], "background": "plain"}
    entry = ({"pixel_values": None, "grid_sizes": torch.tensor([[1, 6, 6]])}, None, row)
    rng, seen = np.random.default_rng(0), set()
    for _ in range(12):
        moved, labels, same_row = vision_pretrain.shifted_entry(entry, pixels, index, 25, rng, processor, 14)
        assert same_row is row and torch.equal(moved["grid_sizes"], entry[0]["grid_sizes"])
        # Exactly one roll within the bounds gives these patches; the labels are that roll's.
        matches = [(dy, dx) for dy in range(-20, 26) for dx in range(-25, 26)
                   if torch.equal(processor.image_processor.to_patches(np.roll(pixels, (dy, dx), (0, 1))[None], 1),
                                  moved["pixel_values"])]
        assert len(matches) == 1
        rolled = np.roll(pixels, matches[0], (0, 1))
        expected = vision_pretrain.patch_labels(rolled, {"red": "square"}, 14)
        assert all(torch.equal(getattr(labels, f), getattr(expected, f)) for f in ("colour", "shape", "position"))
        assert (vision_pretrain.palette_index(rolled) > 0).sum() == 21 * 21  # nothing wrapped round
        seen.add(matches[0])
    assert len(seen) > 6
    with pytest.raises(ValueError, match="shift=-1: the largest shift"):
        vision_pretrain.pretrain_vision(None, None, None, None, steps=1, batch=1, lr=1e-3, shift=-1)


def test_shift_refuses_images_the_processor_would_resize(tmp_path):
    import json

    from PIL import Image

    from recipes.tiny import train_default

    paths = curriculum.generate(tmp_path, seed=5, images=2, videos=0, texts=2)
    Image.fromarray(np.full((90, 84, 3), 120, dtype=np.uint8)).save(tmp_path / "odd.png")
    row = {"image": "odd.png", "objects": [], "background": "plain"}
    (tmp_path / "odd.jsonl").write_text(paths["vision"].read_text() + json.dumps(row) + "\n")
    tokenizer = train_default.build_tokenizer(curriculum.corpus_text(paths))
    model, processor = train_default.build_model(tokenizer), train_default.build_processor(tokenizer)
    with pytest.raises(ValueError, match=r"odd.png: 84x90 px, but the processor serves it at 84x84"):
        vision_pretrain.pretrain_vision(model, processor, tmp_path / "odd.jsonl", tmp_path, steps=1, batch=2, lr=1e-3,
                                        shift=3)


def test_frame_block_targets_read_each_merged_token_as_the_scene_step_lays_it_out():
    frame = np.full((112, 112, 3), 120, dtype=np.uint8)
    frame[30:60, 60:90] = curriculum.COLOURS["red"]  # merged blocks (1, 2), (1, 3), (2, 2), (2, 3)
    frame[5:8, 5:8] = curriculum.COLOURS["blue"]  # 9 pixels: block (0, 0) is covered too
    row = {"objects": [{"colour": "red", "shape": "square", "quadrant": "top right"},
                       {"colour": "blue", "shape": "circle", "quadrant": "top left"}], "background": "plain"}
    words = {w: torch.randn(6) for w in [*curriculum.COLOURS, *curriculum.SHAPES, *curriculum.QUADRANTS]}
    covered, targets = vision_pretrain.frame_block_targets(row, frame, words.__getitem__, patch=14)
    expected = torch.zeros(16, dtype=torch.bool)
    expected[[0, 6, 7, 10, 11]] = True
    assert torch.equal(covered, expected)
    red_square = words["red"] + words["square"]
    torch.testing.assert_close(targets, torch.stack([
        words["blue"] + words["circle"] + words["top left"],
        red_square + words["top right"], red_square + words["top right"],
        red_square + words["bottom right"], red_square + words["bottom right"],
    ]))


def test_alignment_with_video_stills_adds_their_merged_error_and_keeps_the_image_batches(tmp_path):
    runs = weighted_runs(tmp_path, vision_pretrain.align_projector, "frame_weight", 4, dict(videos=3, video_frames=True),
                         frames="frames.jsonl")
    assert runs[0.0][0] < runs[1.0][0]  # the same first image batch, plus the stills' error
    assert runs[0.0] != runs[1.0]


@pytest.mark.parametrize("train", [vision_pretrain.align_projector, vision_pretrain.pretrain_vision])
def test_training_with_stills_needs_their_rows_file(tmp_path, train):
    from recipes.tiny import train_default

    paths = curriculum.generate(tmp_path, seed=5, images=2, videos=0, texts=2)
    tokenizer = train_default.build_tokenizer(curriculum.corpus_text(paths))
    model, processor = train_default.build_model(tokenizer), train_default.build_processor(tokenizer)
    for frames in (None, "frames.jsonl"):
        with pytest.raises(ValueError, match=rf"frames={frames!r}: frame_weight=1.0 needs the stills' rows file"):
            train(model, processor, paths["vision"], tmp_path, steps=1, batch=2, lr=1e-3, frames=frames, frame_weight=1.0)


def test_frame_block_targets_and_labels_refuse_a_still_that_is_not_a_video_frame():
    row = {"image": "x.png", "objects": [], "background": "plain"}
    pixels = np.zeros((84, 84, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="x.png: a still of 84x84 px in 14 px patches; stills are video frames of 112 px"):
        vision_pretrain.frame_block_targets(row, pixels, None, patch=14)
    with pytest.raises(ValueError, match="x.png: a still of 84x84 px in 14 px patches; stills are video frames of 112 px"):
        vision_pretrain.block_labels(row, pixels, patch=14)


def test_block_labels_name_what_covers_each_merged_token():
    frame = np.full((112, 112, 3), 120, dtype=np.uint8)
    frame[30:60, 60:90] = curriculum.COLOURS["red"]  # of 784 pixels: block (1, 2) 624, (1, 3) 156, (2, 2) 96, (2, 3) 24
    frame[5:8, 5:8] = curriculum.COLOURS["blue"]  # 9 pixels of block (0, 0)
    row = {"objects": [{"colour": "red", "shape": "square"}, {"colour": "blue", "shape": "circle"}]}
    labels = vision_pretrain.block_labels(row, frame, patch=14)
    expected = torch.zeros(16, dtype=torch.long)
    expected[[6, 7]] = 1  # covered at least 15%
    assert torch.equal(labels.colour, expected * (list(curriculum.COLOURS).index("red") + 1))
    assert torch.equal(labels.shape, expected * (curriculum.SHAPES.index("square") + 1))
    assert labels.position is None


def test_vision_pretraining_with_stills_adds_their_merged_tokens_loss(tmp_path):
    runs = weighted_runs(tmp_path, vision_pretrain.pretrain_vision, "frame_weight", 4, dict(videos=3, video_frames=True),
                         frames="frames.jsonl", background_weight=1.0)
    assert runs[0.0][0] < runs[1.0][0]  # the same first image batch, plus the stills' loss
    assert runs[0.0] != runs[1.0]
