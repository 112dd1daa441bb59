"""service.decode turns every format upright exactly once, as PIL.ImageOps.exif_transpose (ComfyUI's
LoadImage) does, wherever the format keeps its EXIF orientation."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from PIL import Image, ImageOps, PngImagePlugin

from service.decode import DecodedImage, decode_bytes
from tests.conftest import load_photo

SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "JPEG": {"quality": 95},
    "PNG": {},
    "WEBP": {"lossless": True},
    "TIFF": {},
    "TIFF-deflate": {"compression": "tiff_deflate"},  # libtiff decodes it; Pillow's own decoder does the raw one
}


@functools.cache
def photo() -> np.ndarray:
    """Not square, so that a transpose shows in the shape."""
    return np.ascontiguousarray(load_photo("chelsea")[40:136, 60:204])


def exif_block(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def saved(im: Image.Image, kind: str, **options: object) -> bytes:
    out = io.BytesIO()
    im.save(out, format=kind.split("-")[0], **SAVE_OPTIONS.get(kind, {}), **options)
    return out.getvalue()


def decode(data: bytes) -> DecodedImage:
    return decode_bytes(data, path="watch/source.img", max_pixels=10**8)


def exif_transposed(data: bytes) -> np.ndarray:
    """What ComfyUI's LoadImage shows: Pillow's first frame, exif_transpose, RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB")).astype(int)


def assert_upright(result: DecodedImage, reference: np.ndarray, *, tolerance: float = 0.5) -> None:
    assert result.rgb.shape == reference.shape and result.rgb.flags.c_contiguous
    assert result.source_size == (reference.shape[1], reference.shape[0])
    assert np.abs(result.rgb.astype(int) - reference).mean() < tolerance


@pytest.mark.parametrize("kind", sorted(SAVE_OPTIONS))
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_once_as_exif_transpose_does(kind: str, orientation: int) -> None:
    data = saved(Image.fromarray(photo()), kind, exif=exif_block(orientation))
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == orientation  # the writer stored it where Pillow reads it
    assert_upright(decode(data), exif_transposed(data))


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])
@pytest.mark.parametrize("variant", ["CMYK JPEG", "progressive JPEG", "grey TIFF", "RGBA TIFF", "animated WebP"])
def test_the_pillow_paths_are_upright_too(variant: str, orientation: int) -> None:
    im = Image.fromarray(photo())
    exif = exif_block(orientation)
    if variant == "CMYK JPEG":
        data = saved(im.convert("CMYK"), "JPEG", exif=exif)
    elif variant == "progressive JPEG":
        data = saved(im, "JPEG", exif=exif, progressive=True)
    elif variant == "grey TIFF":
        data = saved(im.convert("L"), "TIFF-deflate", exif=exif)
    elif variant == "RGBA TIFF":
        data = saved(im.convert("RGBA"), "TIFF", exif=exif)
    else:
        data = saved(im, "WEBP", exif=exif, save_all=True, append_images=[Image.fromarray(photo()[::-1])])
    assert_upright(decode(data), exif_transposed(data), tolerance=1.0)


def raw_profile(orientation: int) -> str:
    """EXIF the ImageMagick way: "\\nexif\\n<length>\\n" then the block in hex, 72 digits a line."""
    raw = b"Exif\x00\x00" + exif_block(orientation)
    digits = raw.hex()
    return f"\nexif\n{len(raw):8d}\n" + "\n".join(digits[i : i + 72] for i in range(0, len(digits), 72)) + "\n"


def png_with_text(key: str, value: str, chunk: str, **options: object) -> bytes:
    info = PngImagePlugin.PngInfo()
    if chunk == "iTXt":
        info.add_itxt(key, value, zip=True)
    else:
        info.add_text(key, value, zip=chunk == "zTXt")
    return saved(Image.fromarray(photo()), "PNG", pnginfo=info, **options)


@pytest.mark.parametrize("chunk", ["tEXt", "zTXt", "iTXt"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_png_raw_profile_exif_is_applied_like_pillow(chunk: str, orientation: int) -> None:
    data = png_with_text("Raw profile type exif", raw_profile(orientation), chunk)
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == orientation and "exif" not in im.info  # no eXIf chunk
    result = decode(data)
    assert_upright(result, exif_transposed(data))
    assert result.text["Raw profile type exif"] == raw_profile(orientation)


def test_an_exif_chunk_wins_over_a_raw_profile_as_in_pillow() -> None:
    data = png_with_text("Raw profile type exif", raw_profile(6), "zTXt", exif=exif_block(3))
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == 3
    assert_upright(decode(data), exif_transposed(data))


@pytest.mark.parametrize(
    "value",
    ["\nexif\n      12\nnot hex at all\n", "\nexif\n", "", "\nexif\n      40\n" + "00" * 40 + "\n"],
    ids=["not-hex", "no-lines", "empty", "zeros"],
)
def test_a_raw_profile_that_holds_no_orientation_leaves_the_image_as_stored(value: str) -> None:
    result = decode(png_with_text("Raw profile type exif", value, "tEXt"))
    assert np.array_equal(result.rgb, photo()) and result.source_size == (photo().shape[1], photo().shape[0])


def xmp_packet(orientation: int, *, element: bool = False) -> str:
    """XMP as photo editors write it: tiff:Orientation as an attribute, or as an element."""
    value = (
        f"<tiff:Orientation>{orientation}</tiff:Orientation>"
        if element
        else f'<rdf:Description tiff:Orientation="{orientation}"/>'
    )
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        f'xmlns:tiff="http://ns.adobe.com/tiff/1.0/">{value}</rdf:RDF></x:xmpmeta>'
    )


@pytest.mark.parametrize("element", [False, True], ids=["attribute", "element"])
@pytest.mark.parametrize("container", ["PNG iTXt", "PNG tEXt", "WEBP"])
@pytest.mark.parametrize("orientation", [2, 3, 6, 8])
def test_xmp_orientation_is_applied_like_pillow_where_no_exif_says_otherwise(
    container: str, orientation: int, element: bool
) -> None:
    packet = xmp_packet(orientation, element=element)
    if container == "WEBP":
        data = saved(Image.fromarray(photo()), "WEBP", xmp=packet.encode())
    else:
        data = png_with_text("XML:com.adobe.xmp", packet, container.split()[1])
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == orientation  # Pillow, hence ComfyUI, reads it
    assert_upright(decode(data), exif_transposed(data))


@pytest.mark.parametrize("exif", [exif_block(3), Image.Exif().tobytes()], ids=["with-orientation", "without"])
@pytest.mark.parametrize("container", ["PNG", "WEBP"])
def test_an_exif_orientation_wins_over_xmp_and_an_exif_block_without_one_does_not(container: str, exif: bytes) -> None:
    packet = xmp_packet(6)
    if container == "WEBP":
        data = saved(Image.fromarray(photo()), "WEBP", xmp=packet.encode(), exif=exif)
    else:
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", packet)
        data = saved(Image.fromarray(photo()), "PNG", pnginfo=info, exif=exif)
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == (3 if exif == exif_block(3) else 6)
    assert_upright(decode(data), exif_transposed(data))


def test_of_two_exif_chunks_in_a_webp_the_first_counts_as_in_pillow() -> None:
    """Some metadata tools append a chunk rather than replace it; libwebp's demuxer reads the first."""
    data = saved(Image.fromarray(photo()), "WEBP", exif=exif_block(6))
    second = exif_block(1)
    chunk = b"EXIF" + len(second).to_bytes(4, "little") + second + b"\0" * (len(second) & 1)
    data = data[:4] + (len(data) - 8 + len(chunk)).to_bytes(4, "little") + data[8:] + chunk
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == 6
    assert_upright(decode(data), exif_transposed(data))
