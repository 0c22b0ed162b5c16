"""Offline data images: every Pillow mode converted to RGB in [0, 1] by its real range, or refused in one line."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from directalign.data import DataError, load_offline, to_rgb, to_srgb
from directalign.data import _load_image as load_image

MEAN_16 = 0.594


def _gray16(mean: float = MEAN_16, size: int = 32) -> np.ndarray:
    """A 16-bit gradient (left dark, right bright) whose mean is ``mean`` of full scale."""
    ramp = np.linspace(-0.3, 0.3, size)[None, :] + mean
    return np.round(np.repeat(ramp, size, axis=0) * 65535).astype(np.uint16)


def test_16_bit_grayscale_png_keeps_its_brightness(tmp_path):
    """Issue 16 item 3: a 16-bit grayscale PNG loaded as solid white (Pillow's RGB conversion clips 0..65535 at
    255); its mean must stay 0.594 at the training size and after resizing."""
    path = tmp_path / "gray16.png"
    Image.fromarray(_gray16()).save(path)
    assert Image.open(path).mode == "I;16"  # what Pillow opens a 16-bit grayscale PNG as
    img = load_image(path, 32, 32)
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert float(img.mean()) == pytest.approx(MEAN_16, abs=1e-4)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert float(img[:, :, 0].mean()) < 0.35 and float(img[:, :, -1].mean()) > 0.85  # the gradient survives
    small = load_image(path, 16, 16)
    assert float(small.mean()) == pytest.approx(MEAN_16, abs=2e-3)


@pytest.mark.parametrize("fmt", ["tiff", "ppm"])
def test_16_bit_in_other_containers(tmp_path, fmt):
    """Big-endian 16-bit TIFF (mode I;16B) and a 16-bit PGM (opened as mode I with rawmode I;16B)."""
    arr = _gray16()
    path = tmp_path / f"gray16.{fmt}"
    Image.fromarray(arr.astype(">u2") if fmt == "tiff" else arr).save(path)
    assert float(load_image(path, 32, 32).mean()) == pytest.approx(MEAN_16, abs=1e-4)


def test_32_bit_integer_and_float_images(tmp_path):
    ints = tmp_path / "int32.tiff"
    Image.fromarray(np.full((8, 8), 2**30, dtype=np.int32)).save(ints)  # signed 32-bit: 2^30 of 2^31 - 1
    assert Image.open(ints).mode == "I"
    assert float(load_image(ints, 8, 8).mean()) == pytest.approx(2**30 / (2**31 - 1), abs=1e-6)
    floats = tmp_path / "float.tiff"
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32)).save(floats)
    assert Image.open(floats).mode == "F"
    assert float(load_image(floats, 8, 8).mean()) == pytest.approx(0.25, abs=1e-6)


def _pixel(im: Image.Image, path="x") -> tuple[float, float, float]:
    out = to_rgb(im, None, path)
    arr = np.asarray(out, dtype=np.float32) / 255.0 if isinstance(out, Image.Image) else np.asarray(out)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return tuple(round(float(v), 3) for v in arr[0, 0])


# (mode, the pixel value, the expected RGB in [0, 1]): every mode Pillow has, through to_rgb
WHITE = (1.0, 1.0, 1.0)
MODES = [
    ("1", 1, WHITE),
    ("L", 51, (0.2, 0.2, 0.2)),
    ("LA", (51, 255), (0.2, 0.2, 0.2)),
    ("LA", (51, 0), WHITE),  # fully transparent: the white background
    ("RGB", (255, 0, 51), (1.0, 0.0, 0.2)),
    ("RGBA", (255, 0, 51, 255), (1.0, 0.0, 0.2)),
    ("RGBA", (0, 0, 0, 0), WHITE),  # transparent black stored as (0, 0, 0, 0): white, not black
    ("RGBA", (0, 0, 0, 102), (0.6, 0.6, 0.6)),  # 40% black over white
    ("RGBa", (102, 0, 0, 102), (1.0, 0.6, 0.6)),  # premultiplied: 40% red over white
    ("RGBX", (255, 0, 51, 0), (1.0, 0.0, 0.2)),
    ("CMYK", (0, 255, 0, 0), (1.0, 0.0, 1.0)),  # magenta ink
    ("YCbCr", (100, 128, 128), (0.392, 0.392, 0.392)),  # neutral: Y only
    ("LAB", (255, 128, 128), WHITE),  # L* = 100, neutral
    ("HSV", (85, 255, 255), (0.0, 1.0, 0.0)),  # hue 120 degrees
    ("I;16", 13107, (0.2, 0.2, 0.2)),
    ("I;16B", 13107, (0.2, 0.2, 0.2)),
    ("I;16L", 13107, (0.2, 0.2, 0.2)),
    ("F", 0.2, (0.2, 0.2, 0.2)),
]


@pytest.mark.parametrize("mode,value,expected", MODES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(MODES)])
def test_every_mode_converts_by_its_definition(mode, value, expected):
    assert _pixel(Image.new(mode, (2, 2), value)) == pytest.approx(expected, abs=0.005)


def test_palette_modes():
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 255, 0, 51] + [0] * 762)
    assert _pixel(p) == pytest.approx((1.0, 0.0, 0.2), abs=0.005)
    p.info["transparency"] = 1  # the palette entry marked transparent (PNG tRNS / GIF)
    assert _pixel(p) == WHITE
    pa = Image.new("PA", (2, 2), (1, 0))
    pa.putpalette([0, 0, 0, 255, 0, 51] + [0] * 762)
    assert _pixel(pa) == WHITE


def test_saved_files_of_each_format_round_trip(tmp_path):
    """The modes as files really arrive: palette PNG with transparency, LA PNG, CMYK TIFF, LAB TIFF, RGBA WebP."""
    cases = []
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 51] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=0)
    cases.append(("p.png", (1.0, 0.0, 0.2)))
    Image.new("LA", (4, 4), (51, 0)).save(tmp_path / "la.png")
    cases.append(("la.png", WHITE))
    Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(tmp_path / "cmyk.tiff")
    cases.append(("cmyk.tiff", (1.0, 0.0, 1.0)))
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "rgba.webp", lossless=True)
    cases.append(("rgba.webp", WHITE))
    Image.new("1", (4, 4), 1).save(tmp_path / "bw.png")
    cases.append(("bw.png", WHITE))
    for name, expected in cases:
        img = load_image(tmp_path / name, 4, 4)
        got = tuple(round(float(img[c].mean()), 3) for c in range(3))
        assert got == pytest.approx(expected, abs=0.005), name


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored sideways with an Orientation tag is used upright, as viewers show it."""
    arr = np.zeros((16, 32, 3), dtype=np.uint8)
    arr[:, :16] = (255, 0, 0)  # stored: red left, blue right
    arr[:, 16:] = (0, 0, 255)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 3  # rotated 180 degrees
    path = tmp_path / "rotated.jpg"
    im.save(path, quality=100, exif=exif)
    img = load_image(path, 16, 32)
    assert float(img[2, :, :8].mean()) > 0.9 and float(img[0, :, :8].mean()) < 0.1  # blue now on the left
    assert float(img[0, :, -8:].mean()) > 0.9


def _linear_rgb_icc(description: str = "Linear RGB, sRGB primaries") -> bytes:
    """An ICC v2 display profile with sRGB's primaries (D50-adapted, as in the sRGB profile) and an identity tone
    curve: linear light. Built field by field from the ICC.1 spec, so the test needs no profile file."""
    def s15(x):
        return struct.pack(">i", round(x * 65536))

    def xyz(x, y, z):
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    text = description.encode("ascii") + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    curve = b"curv" + bytes(4) + struct.pack(">I", 0)  # no entries: the identity
    data = {"desc": desc, "wtpt": xyz(0.9642, 1.0, 0.8249), "rXYZ": xyz(0.4361, 0.2225, 0.0139),
            "gXYZ": xyz(0.3851, 0.7169, 0.0971), "bXYZ": xyz(0.1431, 0.0606, 0.7141), "rTRC": curve}
    tags = [*data, "gTRC", "bTRC"]  # the three curves share one element
    offset, body, where = 128 + 4 + 12 * len(tags), b"", {}
    for sig, blob in data.items():
        where[sig] = (offset + len(body), len(blob))
        body += blob + bytes(-len(blob) % 4)
    where["gTRC"] = where["bTRC"] = where["rTRC"]
    table = struct.pack(">I", len(tags)) + b"".join(sig.encode() + struct.pack(">II", *where[sig]) for sig in tags)
    size = 128 + len(table) + len(body)
    header = (struct.pack(">I", size) + bytes(4) + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
              + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + bytes(24) + struct.pack(">I", 0)
              + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48))
    assert len(header) == 128
    return header + table + body


def _srgb_encode(linear: float) -> float:
    """IEC 61966-2-1's transfer function: linear light in [0, 1] -> the stored sRGB value in [0, 1]."""
    return 12.92 * linear if linear <= 0.0031308 else 1.055 * linear ** (1 / 2.4) - 0.055


def test_a_colour_profile_is_converted_to_srgb(tmp_path, caplog):
    """A PNG stored in linear light with its profile is read as the sRGB image it shows; an sRGB-tagged or untagged
    file keeps its exact pixels; a profile that cannot be applied leaves the pixels, with a warning."""
    from PIL import ImageCms

    arr = np.zeros((8, 8, 3), dtype=np.uint8)
    arr[:4] = 64  # grey rows: linear 64/255 and 128/255
    arr[4:] = 128
    arr[:, :2] = (255, 0, 0)  # a primary: the same red in both spaces
    im = Image.fromarray(arr)
    linear = tmp_path / "linear.png"
    im.save(linear, icc_profile=_linear_rgb_icc())
    got = load_image(linear, 8, 8).permute(1, 2, 0).numpy() * 255
    assert got[0, 4] == pytest.approx([_srgb_encode(64 / 255) * 255] * 3, abs=1.0)  # 137.2, not 64
    assert got[6, 4] == pytest.approx([_srgb_encode(128 / 255) * 255] * 3, abs=1.0)  # 187.8, not 128
    assert got[0, 0] == pytest.approx([255, 0, 0], abs=1.0)
    for name, kwargs in (("srgb.png", {"icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
                                       .tobytes()}), ("plain.png", {})):
        im.save(tmp_path / name, **kwargs)
        assert np.array_equal(np.round(load_image(tmp_path / name, 8, 8).permute(1, 2, 0).numpy() * 255), arr)
    broken = Image.fromarray(arr)
    broken.info["icc_profile"] = b"not a profile"
    with caplog.at_level("WARNING", logger="directalign"):
        assert to_srgb(broken, "x.png") is broken
    assert "image x.png: its colour profile cannot be applied" in caplog.text


def test_a_profiled_image_keeps_its_transparency(tmp_path):
    """A transparent colour (PNG tRNS) or a palette beside a non-sRGB profile: the transparent pixels still flatten
    to white, and only the visible colours go through the profile (a palette's colours included)."""
    arr = np.full((8, 8, 3), 128, dtype=np.uint8)
    arr[:, :4] = 64  # the transparent colour on the left half
    rgb = tmp_path / "trns.png"
    Image.fromarray(arr).save(rgb, icc_profile=_linear_rgb_icc(), transparency=(64, 64, 64))
    palette = tmp_path / "palette.png"
    two_colours = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    two_colours.save(palette, icc_profile=_linear_rgb_icc())
    with Image.open(rgb) as opened:
        assert opened.mode == "RGB" and opened.info["transparency"] == (64, 64, 64)
    got = load_image(rgb, 8, 8).permute(1, 2, 0).numpy() * 255
    assert got[3, 1] == pytest.approx([255] * 3, abs=0.5)  # transparent: the white background
    assert got[3, 6] == pytest.approx([_srgb_encode(128 / 255) * 255] * 3, abs=1.0)  # 187.8: converted
    with Image.open(palette) as opened:
        assert opened.mode == "P" and np.array_equal(np.asarray(opened.convert("RGB")), arr)  # exact palette colours
    got = load_image(palette, 8, 8).permute(1, 2, 0).numpy() * 255
    assert got[3, 1] == pytest.approx([_srgb_encode(64 / 255) * 255] * 3, abs=1.0)  # 137.2: the palette converted
    assert got[3, 6] == pytest.approx([_srgb_encode(128 / 255) * 255] * 3, abs=1.0)


@pytest.mark.parametrize("make,needle", [
    (lambda: Image.fromarray(np.full((4, 4), 2.0, dtype=np.float32)), "values in [2, 2], outside [0, 1]"),
    (lambda: Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)), "non-finite values"),
    (lambda: Image.fromarray(np.full((4, 4), -5, dtype=np.int32)), "negative pixel values"),
], ids=["float-above-1", "float-nan", "signed-negative"])
def test_out_of_range_images_are_refused_in_one_line(tmp_path, make, needle):
    path = tmp_path / "bad.tiff"
    make().save(path)
    with pytest.raises(DataError) as e:
        load_image(path, 4, 4)
    message = str(e.value)
    assert needle in message and "bad.tiff" in message and "save it as" in message
    assert "\n" not in message


def test_modes_without_a_faithful_reading_are_refused():
    with pytest.raises(DataError, match=r"mode 'La'.*save it as an 8-bit RGB"):
        to_rgb(Image.new("La", (2, 2)), None, "x.png")
    with pytest.raises(DataError, match="bit depth"):  # mode I whose decoder did not say how it was stored
        to_rgb(Image.new("I", (2, 2), 5), None, "x.png")


def test_manifest_of_mixed_modes_loads(tmp_path):
    """A manifest can list any file Pillow opens; a 16-bit PNG next to an 8-bit JPEG and a float TIFF."""
    Image.fromarray(_gray16()).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "b.jpg", quality=100)
    Image.fromarray(np.full((32, 32), 0.5, dtype=np.float32)).save(tmp_path / "c.tiff")
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("".join(f'{{"image": "{n}", "caption": "cap {n}"}}\n' for n in ("a.png", "b.jpg", "c.tiff")))
    data = load_offline(str(manifest), 32, 32)
    assert data.images.shape == (3, 3, 32, 32)
    assert [round(float(data.images[i].mean()), 3) for i in range(3)] == pytest.approx([MEAN_16, 1 / 3, 0.5],
                                                                                      abs=2e-3)


def test_float_tiff_fixture_for_the_bad_input_table():
    """tests/data/offline-float-range (a manifest listing a float TIFF with values up to 2) is refused."""
    manifest = Path(__file__).parent / "data" / "offline-float-range" / "manifest.jsonl"
    with pytest.raises(DataError, match="outside \\[0, 1\\]"):
        load_offline(str(manifest), 32, 32)
