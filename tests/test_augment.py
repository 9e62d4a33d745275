import pytest
import torch

from medxfer.data.augment import Augmentation, augment_batch, get_augmentation
from medxfer.errors import MedxferError


def test_augment_is_per_image_and_reproducible():
    images = torch.rand(1, 1, 32, 32).repeat(4, 1, 1, 1)
    out1 = augment_batch(images, Augmentation(), torch.Generator().manual_seed(0))
    out2 = augment_batch(images, Augmentation(), torch.Generator().manual_seed(0))
    assert out1.shape == images.shape and out1.min() >= 0 and out1.max() <= 1
    torch.testing.assert_close(out1, out2)
    assert not torch.allclose(out1[0], out1[1])  # each image gets its own parameters


def test_identity_augmentation_keeps_image():
    images = torch.rand(3, 1, 16, 16)
    identity = Augmentation(
        crop_scale=(1, 1), crop_ratio=(1, 1), rotation_deg=0, hflip_p=0, brightness=0, contrast=0
    )
    out = augment_batch(images, identity, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-5, rtol=0)


def test_flip_mirrors_image():
    images = torch.rand(2, 1, 16, 16)
    flip = Augmentation(
        crop_scale=(1, 1), crop_ratio=(1, 1), rotation_deg=0, hflip_p=1.0, brightness=0, contrast=0
    )
    out = augment_batch(images, flip, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images.flip(-1), atol=1e-5, rtol=0)


def test_unknown_preset():
    with pytest.raises(MedxferError, match="unknown preset"):
        get_augmentation("heavy")
