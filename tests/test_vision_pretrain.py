"""Dense patch labels of the vision pretraining (the SigLIP stand-in of the tiny recipe)."""

import numpy as np
import pytest
import torch

from tools import curriculum, vision_pretrain


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
    from tools import train_default

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
