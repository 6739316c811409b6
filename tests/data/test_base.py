"""anomgen.data.base: reading images of every bit depth into float 3×H×W RGB in [0, 1]."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from anomgen.data.base import read_image, read_mask
from anomgen.errors import DatasetError


def _write_png16_rgb(path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL writes none): H×W×3 uint16."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width, _ = array.shape
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def test_a_16_bit_grey_png_is_scaled_by_its_bit_depth(tmp_path):
    values = np.linspace(0, 65535, 6 * 8).round().astype(np.uint16).reshape(6, 8)  # 0 ... 65535
    values[0, 1] = 1000  # dark grey: white if 16-bit values were clipped at 255
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"  # what PIL makes of it (the case that used to read as white)
    image = read_image(path)
    assert image.shape == (3, 6, 8) and image.dtype == torch.float32
    expected = torch.from_numpy(values.astype(np.float64) / 65535).float()
    for channel in image:
        torch.testing.assert_close(channel, expected, rtol=0, atol=1e-6)
    assert image.min() == 0.0 and image.max() == 1.0
    assert abs(float(image[0, 0, 1]) - 1000 / 65535) < 1e-6


def test_an_integer_image_beyond_16_bits_names_the_file(tmp_path):
    path = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I").save(path)
    with pytest.raises(DatasetError, match=r"wide.tif: grey values span \[0, 70000\]; expected 8- or 16-bit"):
        read_image(path)


def test_a_16_bit_rgb_png_reads_as_its_high_bytes(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint16)
    rgb[..., 0] = [[0, 0x8000, 0xFFFF], [0x1234, 0x00FF, 0xFF00]]
    rgb[..., 1] = 0xFFFF
    rgb[..., 2] = 0x0100
    path = tmp_path / "rgb16.png"
    _write_png16_rgb(path, rgb)
    image = read_image(path)
    expected = torch.from_numpy((rgb >> 8).astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(image, expected, rtol=0, atol=1e-6)


def test_an_8_bit_image_is_divided_by_255(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey).save(tmp_path / "grey8.png")
    image = read_image(tmp_path / "grey8.png")
    torch.testing.assert_close(image, torch.from_numpy(grey / 255.0).float()[None].expand(3, -1, -1), rtol=0,
                               atol=1e-6)


def test_a_float_tiff_in_0_1_reads_as_it_is(tmp_path):
    values = np.linspace(0, 1, 4 * 5, dtype=np.float32).reshape(4, 5)  # PIL's RGB conversion made this black
    path = tmp_path / "float.tif"
    Image.fromarray(values, mode="F").save(path)
    image = read_image(path)
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32
    for channel in image:
        torch.testing.assert_close(channel, torch.from_numpy(values), rtol=0, atol=0)


@pytest.mark.parametrize("values, told", [
    ([[0.0, 150.0, 300.0]], r"span \[0, 300\];"),  # 0-255 or 0-65535 floats: a scale the file does not say
    ([[-0.5, 0.5, 1.0]], r"span \[-0.5, 1\];"),
    ([[0.0, float("nan"), 1.0]], r"span \[0, 1\] with NaN or inf;"),
])
def test_a_float_image_outside_0_1_names_the_file_instead_of_clipping(tmp_path, values, told):
    path = tmp_path / "float_bad.tif"
    Image.fromarray(np.array(values, dtype=np.float32), mode="F").save(path)
    with pytest.raises(DatasetError, match=rf"float_bad.tif: float values {told} expected a float image in \[0, 1\]"):
        read_image(path)


def test_a_float_mask_is_binarised_on_its_values(tmp_path):
    """Every pixel above 0 is anomalous, as for integer masks; PIL's 8-bit conversion rounded 0.3 to 0 before."""
    path = tmp_path / "mask.tif"
    Image.fromarray(np.array([[0.0, 0.3, 0.6, 1.0]], dtype=np.float32), mode="F").save(path)
    torch.testing.assert_close(read_mask(path), torch.tensor([[0.0, 1.0, 1.0, 1.0]]), rtol=0, atol=0)
