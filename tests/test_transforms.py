"""The evaluation transform (timm's) and the one normalisation: a Batch's uint8 HWC images in, the
model's float NCHW input out, channels-last memory kept or made contiguous."""
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import MEAN, STD, eval_transform, normalize


def test_normalize_turns_uint8_hwc_into_normalised_nchw():
    images = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    for channels_last in (True, False):
        x = normalize(images, channels_last)
        assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
        expected = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(STD).view(1, 3, 1, 1)
        torch.testing.assert_close(x, expected)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                               else torch.contiguous_format)


@pytest.mark.parametrize("crop_mode", ["squash", "center"])
def test_eval_transform_gives_uint8_chw_at_the_test_resolution(crop_mode):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), np.uint8))
    out = torch.as_tensor(eval_transform(32, 0.875, "bicubic", crop_mode)(img))
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
