"""Validate a layout file, fit the reference stain once, normalize every slide (stage ``normalize``).

Writes ``data/normalized/slides.h5`` (the same competition layout, images as uint8, spot tables
copied) and ``data/normalized/stain.json`` (the fitted reference; checkpoints carry it for predict).
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py

from src.core.errors import InputError
from src.core.files import atomic_path
from src.core.sections import StainConfig
from src.data.preprocessing.stain import StainNormalizer
from src.data.slides.layout import SlideRef, image_chunks, open_h5, read_image_uint8, read_um_per_px, slide_refs
from src.data.slides.truth import check_truth_file
from src.data.slides.validation import validate_file

SLIDES_FILE = "slides.h5"
STAIN_FILE = "stain.json"


def reference_slide(refs: list[SlideRef], name: str, path: Path) -> SlideRef:
    """The slide to fit the target stain on: ``name``, or the first training slide if empty."""
    if not name:
        return next(r for r in refs if r.split == "Train")
    for ref in refs:
        if ref.name == name:
            return ref
    known = ", ".join(r.name for r in refs)
    raise InputError(f"params: stain.reference = {name!r} is not a slide of {path} ({known})")


def fit_normalizer(h5: h5py.File, ref: SlideRef, cfg: StainConfig) -> StainNormalizer:
    normalizer = StainNormalizer(cfg.method, cfg.luminosity_standardize, cfg.fit_pixels, cfg.seed)
    try:
        return normalizer.fit(read_image_uint8(h5, ref))
    except InputError as err:
        raise InputError(f"{h5.filename}: {ref.image_key}: {err}") from None


def normalize_file(src: Path, out_dir: Path, cfg: StainConfig, truth: Path | None = None,
                   log=print) -> StainNormalizer:
    """Normalize every slide of ``src`` into ``out_dir`` (written whole or not at all). A truth file
    (``data.truth``) is checked against the data here, by the first stage that reads it."""
    validate_file(src)
    if truth is not None:
        check_truth_file(truth, src)
    with open_h5(src) as h5, atomic_path(out_dir) as tmp:
        tmp.mkdir()
        refs = slide_refs(h5)
        reference = reference_slide(refs, cfg.reference, src)
        normalizer = fit_normalizer(h5, reference, cfg)
        with h5py.File(tmp / SLIDES_FILE, "w") as out:
            out.attrs["um_per_px"] = read_um_per_px(h5)
            for ref in refs:
                image = normalizer.transform(read_image_uint8(h5, ref))
                out.create_dataset(ref.image_key, data=image, chunks=image_chunks(image.shape))
                h5.copy(h5[ref.spots_key], out, name=ref.spots_key)
                for group in ("barcodes", "fullres"):  # imported slides: kept with their spots
                    key = f"{group}/{ref.split}/{ref.name}"
                    if key in h5:
                        h5.copy(h5[key], out, name=key)
                log(f"normalized {ref.split}/{ref.name} ({image.shape[0]} x {image.shape[1]})")
        state = normalizer.to_dict() | {"reference_slide": reference.name, "source": str(src)}
        (tmp / STAIN_FILE).write_text(json.dumps(state, indent=2))
    return normalizer
