"""Upload intake: every odd, broken or hostile image is either normalized to 8-bit RGB or refused clearly."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engines.images import (ImageLimits, ImageRejected, ImageTooLarge, UnreadableImage, UnsupportedImage,
                            load_image, read_image)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1×1 PNG whose header claims another size (with a valid CRC), as a decompression bomb's does."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def halves(left: tuple[int, int, int], right: tuple[int, int, int], size: tuple[int, int] = (20, 10)) -> Image.Image:
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def test_plain_rgb_passes_through_unchanged_from_bytes_path_and_str(tmp_path: Path) -> None:
    image = halves(RED, BLUE)
    data = encode(image, "PNG")
    (tmp_path / "a.png").write_bytes(data)
    for source in (data, tmp_path / "a.png", str(tmp_path / "a.png"), image):
        intake = read_image(source)
        assert intake.image.mode == "RGB" and intake.notes == ()
        assert np.array_equal(np.asarray(intake.image), np.asarray(image))
    assert read_image(data).format == "PNG" and read_image(image).format is None


def test_grayscale_and_palette_become_rgb() -> None:
    assert load_image(Image.new("L", (3, 3), 77)).getpixel((1, 1)) == (77, 77, 77)
    palette = Image.new("RGB", (4, 4), BLUE).convert("P")
    assert load_image(encode(palette, "PNG")).getpixel((0, 0)) == BLUE


@pytest.mark.parametrize("data", [b"definitely not an image", encode(Image.new("RGB", (4, 4)), "ICO")])
def test_non_images_and_unaccepted_formats_are_refused(data: bytes) -> None:
    with pytest.raises(UnsupportedImage, match="not an image in a supported format"):
        load_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_files_are_refused(fmt: str) -> None:
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, fmt)
    with pytest.raises(UnreadableImage, match="damaged"):
        load_image(data[: len(data) // 2])


def test_empty_file_and_garbage_after_a_signature_are_refused() -> None:
    with pytest.raises(UnreadableImage, match="empty"):
        load_image(b"")
    with pytest.raises(UnreadableImage, match="damaged"):
        load_image(b"\x89PNG\r\n\x1a\nnonsense")
    with pytest.raises(UnreadableImage, match="no pixels"):
        load_image(Image.new("RGB", (0, 5)))


def test_decompression_bomb_is_refused_by_pillow_and_by_our_cap() -> None:
    # 400 MP is past Pillow's own error threshold; 48 MP passes Pillow but not our 40 MP cap. The data behind
    # both headers is one pixel, so "too large" (not "damaged") proves the header was checked before decoding.
    for width, height in ((20_000, 20_000), (8_000, 6_000)):
        with pytest.raises(ImageTooLarge):
            load_image(png_claiming(width, height))
    assert load_image(png_claiming(1, 1)).size == (1, 1)


def test_huge_sides_bytes_and_custom_limits_are_refused() -> None:
    with pytest.raises(ImageTooLarge, match="pixels per side"):
        load_image(png_claiming(20_000, 10))
    with pytest.raises(UnsupportedImage, match="times longer than wide"):
        load_image(png_claiming(1, 2_100))
    assert load_image(Image.new("RGB", (200, 10))).size == (200, 10)
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    with pytest.raises(ImageTooLarge, match="megapixels"):
        load_image(data, ImageLimits(max_pixels=100))
    with pytest.raises(ImageTooLarge, match="MB"):
        load_image(data, ImageLimits(max_bytes=10))
    with pytest.raises(ImageTooLarge):
        load_image(Image.new("RGB", (30, 30)), ImageLimits(max_pixels=100))


def test_cmyk_is_converted() -> None:
    intake = read_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert intake.image.mode == "RGB" and "CMYK" in " ".join(intake.notes)
    assert np.abs(np.asarray(intake.image, dtype=int) - RED).max() <= 3


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    intake = read_image(encode(Image.fromarray(values), "PNG"))
    assert Image.open(io.BytesIO(encode(Image.fromarray(values), "PNG"))).mode == "I;16"
    assert np.asarray(intake.image)[0, :, 0].tolist() == [0, 1, 128, 255]
    assert "16 to 8 bits" in " ".join(intake.notes)
    wide = Image.fromarray(values.astype(np.int32))  # Pillow's 32-bit "I" holding 16-bit data
    assert np.asarray(load_image(wide))[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("image", [Image.fromarray(np.full((2, 2), 70_000, dtype=np.int32)),
                                   Image.new("F", (2, 2), 0.5)])
def test_unscalable_pixel_types_are_refused(image: Image.Image) -> None:
    with pytest.raises(UnsupportedImage, match="8- or 16-bit"):
        load_image(image)


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    intake = read_image(encode(rgba, "PNG"))
    assert [intake.image.getpixel((x, 0)) for x in range(3)] == [RED, WHITE, (127, 127, 127)]
    assert "white" in " ".join(intake.notes)
    gray_alpha = Image.new("LA", (2, 2), (0, 0))
    assert load_image(encode(gray_alpha, "PNG")).getpixel((0, 0)) == WHITE
    # A palette image whose transparency is one palette index (GIF's and PNG tRNS's way).
    palette = halves(RED, BLUE).convert("P")
    transparent = palette.getpixel((19, 0))
    assert load_image(encode(palette, "GIF", transparency=transparent)).getpixel((19, 0)) == WHITE


def test_animated_images_use_the_first_frame_and_say_so() -> None:
    frames = [Image.new("RGB", (6, 6), color) for color in (RED, BLUE, WHITE)]
    for fmt in ("GIF", "PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
        intake = read_image(data)
        assert intake.image.getpixel((3, 3)) == RED, fmt
        assert "only the first" in " ".join(intake.notes), fmt


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    intake = read_image(encode(halves(RED, BLUE), "JPEG", exif=exif.tobytes(), quality=95))
    upright = np.asarray(intake.image, dtype=int)
    assert intake.image.size == (10, 20)  # was 20×10: rotated a quarter turn
    # Clockwise, the stored left (red) half ends up on top.
    assert np.abs(upright[2, 5] - RED).max() < 40 and np.abs(upright[17, 5] - BLUE).max() < 40
    assert "upright" in " ".join(intake.notes)


def test_refusals_are_value_errors_and_wrong_types_are_type_errors() -> None:
    assert issubclass(ImageRejected, ValueError)
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]
