"""VQGANEncoder.encode_uint8: input validation, output format and batching invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from laion_vq.vqgan import VQGANEncoder, get_model_config, preprocess
from laion_vq.vqgan.reference import sample_photos

TINY = get_model_config("vqgan_gumbel_f8_tiny")


@pytest.fixture(scope="module")
def model() -> VQGANEncoder:
    torch.manual_seed(0)
    return VQGANEncoder(TINY).eval()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return sample_photos(3)


def test_output_format(model: VQGANEncoder, photos: np.ndarray) -> None:
    codes = model.encode_uint8(photos)
    assert codes.dtype == np.int16
    assert codes.shape == (3, 32, 32)
    assert codes.min() >= 0 and codes.max() < TINY.n_embed
    row = codes[0].tobytes()
    assert len(row) == 2048
    np.testing.assert_array_equal(np.frombuffer(row, np.int16).reshape(32, 32), codes[0])


def test_matches_forward_and_accepts_tensors(model: VQGANEncoder, photos: np.ndarray) -> None:
    with torch.inference_mode():
        expected = model(preprocess(torch.from_numpy(photos))).numpy()
    np.testing.assert_array_equal(model.encode_uint8(photos), expected)
    np.testing.assert_array_equal(model.encode_uint8(torch.from_numpy(photos)), expected)


def test_batch_size_invariance(model: VQGANEncoder, photos: np.ndarray) -> None:
    one = model.encode_uint8(photos, batch_size=1)
    three = model.encode_uint8(photos, batch_size=3)
    two = model.encode_uint8(photos, batch_size=2)  # uneven last batch
    np.testing.assert_array_equal(one, three)
    np.testing.assert_array_equal(one, two)


def test_strided_and_read_only_inputs(model: VQGANEncoder, photos: np.ndarray) -> None:
    flipped = photos[:, :, ::-1]  # negative stride view, which torch.from_numpy cannot wrap
    read_only = np.frombuffer(photos.tobytes(), np.uint8).reshape(photos.shape)
    assert not read_only.flags.writeable
    np.testing.assert_array_equal(model.encode_uint8(flipped), model.encode_uint8(np.ascontiguousarray(flipped)))
    np.testing.assert_array_equal(model.encode_uint8(read_only), model.encode_uint8(photos))


def test_empty_input(model: VQGANEncoder) -> None:
    codes = model.encode_uint8(np.zeros((0, 256, 256, 3), np.uint8))
    assert codes.shape == (0, 32, 32) and codes.dtype == np.int16


def test_preprocess_is_exactly_taming_normalisation() -> None:
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1).expand(1, 16, 16, 3)
    y = preprocess(x)
    assert y.shape == (1, 3, 16, 16) and y.dtype == torch.float32
    assert torch.equal(y, x.permute(0, 3, 1, 2).float() / 127.5 - 1)
    assert y.min() == -1 and y.max() == 1
    with pytest.raises(ValueError, match="uint8"):
        preprocess(x.float())


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (np.zeros((2, 256, 256, 3), np.float32), "dtype float32"),
        (np.zeros((2, 256, 256, 3), np.int16), "dtype int16"),
        (np.zeros((256, 256, 3), np.uint8), r"shape \(256, 256, 3\)"),
        (np.zeros((2, 3, 256, 256), np.uint8), r"shape \(2, 3, 256, 256\)"),
        (np.zeros((2, 256, 256, 4), np.uint8), r"shape \(2, 256, 256, 4\)"),
        (np.zeros((2, 256, 256, 1), np.uint8), r"shape \(2, 256, 256, 1\)"),
        (np.zeros((2, 132, 132, 3), np.uint8), "side is a multiple of 8"),
        (np.zeros((2, 256, 240, 3), np.uint8), "side is a multiple of 8"),
        (torch.zeros((2, 256, 256, 3)), "dtype torch.float32"),
    ],
)
def test_rejects_bad_inputs(model: VQGANEncoder, images: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model.encode_uint8(images)  # type: ignore[arg-type]


def test_rejects_non_arrays_and_bad_batch_size(model: VQGANEncoder, photos: np.ndarray) -> None:
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        model.encode_uint8(photos.tolist())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        model.encode_uint8(photos, batch_size=0)


def test_bf16_autocast_on_cpu_gives_valid_codes(model: VQGANEncoder, photos: np.ndarray) -> None:
    """Reduced precision is opt-in; it must still produce well-formed codes close to fp32's."""
    fp32 = model.encode_uint8(photos[:1])
    bf16 = model.encode_uint8(photos[:1], dtype=torch.bfloat16)
    assert bf16.dtype == np.int16 and bf16.shape == (1, 32, 32)
    assert bf16.min() >= 0 and bf16.max() < TINY.n_embed
    assert (bf16 == fp32).mean() > 0.5
