"""Whole-slide files as scanners write them: every reader gives the same pixels at the pipeline's
resolution and the pixel size the file states; a file that says none, or says an editor's 72 dpi,
has none."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from src.core.errors import InputError
from src.data.slides.wsi import choose_level, open_image, read_resampled
from src.data.slides.wsi_write import write_image_pyramid

UM = 0.5  # the files' pixel size
TARGET = 2.0  # the pipeline's


@pytest.fixture(scope="module")
def tissue():
    """A smooth H&E-like image, 1100 x 1300 px (no tile-sized edges: JPEG keeps it)."""
    yy, xx = np.mgrid[0:1100, 0:1300] / 90.0
    r = 200 + 40 * np.sin(xx) * np.cos(yy * 0.7)
    g = 150 + 50 * np.cos(xx * 0.6 + yy)
    b = 210 + 30 * np.sin(yy * 1.3)
    return np.stack([r, g, b], axis=2).clip(0, 255).astype(np.uint8)


def _expected(tissue):
    size = round(tissue.shape[1] * UM / TARGET), round(tissue.shape[0] * UM / TARGET)
    return np.asarray(Image.fromarray(tissue).resize(size, Image.Resampling.LANCZOS)).astype(int)


def _plain_tiff(path, tissue, **options):
    tifffile.imwrite(path, tissue, photometric="rgb", resolution=(1e4 / UM, 1e4 / UM), resolutionunit="CENTIMETER",
                     **options)


WRITERS = {
    "pyramidal TIFF, JPEG tiles": ("slide.tif", lambda p, t: write_image_pyramid(p, t, UM), "tifffile", "centimetre"),
    "Aperio SVS": ("slide.svs", lambda p, t: write_image_pyramid(p, t, UM), "openslide aperio", "openslide.mpp"),
    "TIFF, LZW tiles": ("lzw.tif", lambda p, t: _plain_tiff(p, t, tile=(256, 256), compression="lzw"), "tifffile",
                        "centimetre"),
    "TIFF, JPEG 2000 tiles": ("j2k.tif", lambda p, t: _plain_tiff(p, t, tile=(256, 256), compression="jpeg2000"),
                              "tifffile", "centimetre"),
    "TIFF in strips, deflate": ("strips.tif", lambda p, t: _plain_tiff(p, t, compression="zlib", rowsperstrip=64),
                                "tifffile", "centimetre"),
    "OME-TIFF": ("slide.ome.tif", lambda p, t: tifffile.imwrite(
        p, t, photometric="rgb", tile=(256, 256), metadata={"axes": "YXS", "PhysicalSizeX": UM,
                                                            "PhysicalSizeY": UM}), "tifffile", "OME"),
    "PNG with its dpi": ("slide.png", lambda p, t: Image.fromarray(t).save(p, dpi=(25400 / UM, 25400 / UM)),
                         "pillow", "dpi"),
}


@pytest.mark.parametrize("case", sorted(WRITERS))
def test_every_reader_gives_the_same_pixels_and_the_files_pixel_size(case, tissue, tmp_path):
    name, write, kind, source = WRITERS[case]
    path = tmp_path / name
    write(path, tissue)
    with open_image(path) as image:
        assert image.kind == kind
        assert (image.width, image.height) == (1300, 1100)
        assert image.pixel_size.um_per_px == pytest.approx(UM, rel=1e-3)
        assert source in image.pixel_size.source
        out, level = read_resampled(image, UM / TARGET)
    expected = _expected(tissue)
    assert out.shape == expected.shape
    lossy = "JPEG" in case or "SVS" in case
    assert np.abs(out.astype(int) - expected).mean() < (2.0 if lossy else 0.6), case


def test_a_pyramid_is_read_from_the_coarsest_level_still_fine_enough(tissue, tmp_path):
    path = tmp_path / "slide.svs"
    write_image_pyramid(path, tissue, UM)
    with open_image(path) as image:
        assert [lv.downsample for lv in image.levels] == pytest.approx([1, 2, 4], rel=0.01)
        assert choose_level(image.levels, UM / TARGET).index == 2  # 4x finer than the target: level 2 (2 um/px)
        assert choose_level(image.levels, UM / 1.0).index == 1
        assert choose_level(image.levels, 1.0).index == 0


def test_editors_dpi_and_missing_tags_are_no_pixel_size(tissue, tmp_path):
    tifffile.imwrite(tmp_path / "none.tif", tissue, photometric="rgb")
    tifffile.imwrite(tmp_path / "72dpi.tif", tissue, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    Image.fromarray(tissue).save(tmp_path / "plain.jpg")
    for name in ("none.tif", "72dpi.tif", "plain.jpg"):
        with open_image(tmp_path / name) as image:
            assert image.pixel_size is None, name


def test_unreadable_files_are_one_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a slide")
    (tmp_path / "empty.tif").write_bytes(b"II*\x00")
    for name, message in (("missing.svs", "image not found"), ("notes.txt", "not an image format the readers take"),
                          ("empty.tif", "not a readable TIFF image")):
        with pytest.raises(InputError, match=message) as info:
            open_image(tmp_path / name)
        assert "\n" not in str(info.value)


def test_a_file_the_installed_codecs_cannot_decode_is_one_line(tissue, tmp_path, monkeypatch):
    """A compression without its decoder (tifffile without imagecodecs) is named before any reading."""
    from tifffile import TIFF

    path = tmp_path / "jpeg.tif"
    _plain_tiff(path, tissue, tile=(256, 256), compression="jpeg")

    class Missing(dict):
        def __getitem__(self, key):
            raise KeyError(f"<COMPRESSION.{key.name}: {int(key)}> requires the 'imagecodecs' package")

    monkeypatch.setattr(TIFF, "DECOMPRESSORS", Missing())
    with pytest.raises(InputError, match="JPEG compression cannot be decoded here .*imagecodecs"):
        open_image(path)
