"""Dense patch labels of the vision pretraining (the SigLIP stand-in of the tiny recipe)."""

import numpy as np
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
    assert set(metrics) == {"colour", "shape_of_patch", "shape_of_object"}
