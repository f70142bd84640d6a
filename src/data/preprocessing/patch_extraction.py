"""A square uint8 patch around every spot, with its spot table (stage ``patches``).

Registration (hand-set, estimated or none) shifts each training slide's spots onto its tissue first;
what is written is described in ``src.data.preprocessing.patch_store``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from src.core.errors import InputError
from src.core.files import atomic_path
from src.core.sections import PatchesConfig
from src.data.preprocessing.patch_set import PatchSet
from src.data.preprocessing.patch_store import (
    META_FILE,
    SlideCrops,
    crop_corners,
    crops_file,
    padded_slide,
    slide_file,
    spots_file,
)
from src.data.preprocessing.registration import MIN_SPOTS, Registration, estimate_offset, tissue_cover, tissue_fraction
from src.data.preprocessing.stain import StainNormalizer
from src.data.slides.layout import (
    SlideRef,
    open_h5,
    read_barcodes,
    read_fullres,
    read_image_uint8,
    read_spots,
    read_um_per_px,
    slide_refs,
    target_names,
)
from src.data.slides.validation import validate_file
from src.data.spatial import SPOT_PITCH_UM, lattice_pitch

OFF_TISSUE = 0.5  # a spot whose disc is less than half tissue after correction is "off tissue"


def check_offsets(cfg: PatchesConfig, refs: list[SlideRef]) -> None:
    """Hand-set offsets must name slides of the file."""
    names = {r.name for r in refs}
    for slide in cfg.offsets:
        if slide not in names:
            raise InputError(f"params: patches.offsets.{slide}: no such slide ({', '.join(sorted(names))})")


def _pitch(table: pd.DataFrame, um_per_px: float) -> float:
    """The slide's spot pitch in its pixels (Visium's where it has a single spot)."""
    pitch = lattice_pitch(table["x"].to_numpy(np.float64), table["y"].to_numpy(np.float64))
    return pitch if np.isfinite(pitch) else SPOT_PITCH_UM / um_per_px


def register_slide(image: np.ndarray, ref: SlideRef, table: pd.DataFrame, targets: list[str],
                   cfg: PatchesConfig, um_per_px: float) -> Registration:
    """The offset of one slide: hand-set, estimated (training slides), or none."""
    if ref.name in cfg.offsets:
        return Registration(tuple(int(v) for v in cfg.offsets[ref.name]), "set")
    if ref.split != "Train" or cfg.registration == "none":
        return Registration((0, 0), "none")
    if len(table) < MIN_SPOTS:
        return Registration((0, 0), f"not estimated: {len(table)} spots, fewer than {MIN_SPOTS}")
    max_shift = min(round(cfg.max_shift * _pitch(table, um_per_px)), max(image.shape[:2]))  # px of this slide
    return estimate_offset(image, table["x"].to_numpy(), table["y"].to_numpy(),
                           table[targets].to_numpy(np.float64), max_shift)


def describe(ref: SlideRef, reg: Registration, off_tissue: int, off_before: int, n_spots: int) -> str:
    text = f"{ref.split}/{ref.name}: offset [{reg.offset[0]}, {reg.offset[1]}] {reg.source}"
    if reg.source == "estimated":
        if reg.offset == reg.candidate:
            text += (f" (CV R^2 of image features {reg.r2:.3f} vs {reg.r2_unshifted:.3f} unshifted, "
                     f"{reg.null_r2:.3f} by chance)")
        else:
            text += (f" (best shift {list(reg.candidate)} did not clearly beat none: CV R^2 "
                     f"{reg.r2_unshifted:.3f} unshifted, {reg.null_r2:.3f} by chance)")
    text += f"; {off_tissue} of {n_spots} spots off tissue"
    return text + (f" ({off_before} before the shift)" if reg.offset != (0, 0) else "")


def extract_patches(normalized: Path, out_dir: Path, cfg: PatchesConfig, log=print) -> None:
    """Write the patch arrays, spot tables and meta for every slide of ``normalized``."""
    with open_h5(normalized) as h5, atomic_path(out_dir) as tmp:
        tmp.mkdir()
        refs = slide_refs(h5)
        check_offsets(cfg, refs)
        um_per_px = read_um_per_px(h5)
        meta = {"size": cfg.size, "um_per_px": um_per_px, "offsets": {}, "registration": {}, "targets": [], "slides": {}, "crops": {}}
        for split in ("Train", "Test"):
            split_refs = [r for r in refs if r.split == split]
            tables = [read_spots(h5, r) for r in split_refs]
            if sum(len(t) for t in tables) == 0:
                continue
            if split == "Train":
                meta["targets"] = target_names(list(tables[0].columns))
            name = split.lower()
            slide_file(tmp, name, "-").parent.mkdir()
            rows, crops = [], []
            for number, (ref, table) in enumerate(zip(split_refs, tables)):
                image = read_image_uint8(h5, ref)
                reg = register_slide(image, ref, table, meta["targets"], cfg, um_per_px)
                x, y = table["x"].to_numpy(), table["y"].to_numpy()
                slide, pad = padded_slide(image, cfg.size, reg.offset)
                np.save(slide_file(tmp, name, ref.name), slide)
                corners = crop_corners(x, y, cfg.size, reg.offset, pad)
                crops.append(np.column_stack([np.full(len(table), number), corners]).astype(np.int32))
                cover = tissue_cover(image)
                off_tissue = np.flatnonzero(tissue_fraction(cover, x + reg.offset[0], y + reg.offset[1]) < OFF_TISSUE)
                off_before = int((tissue_fraction(cover, x, y) < OFF_TISSUE).sum())
                rows.append(table.assign(slide=ref.name, spot=np.arange(len(table))))
                meta["offsets"][ref.name] = list(reg.offset)
                meta["registration"][ref.name] = _registration_record(reg, off_tissue, off_before)
                meta["slides"][ref.name] = {"split": split, "height": image.shape[0], "width": image.shape[1],
                                            "n_spots": len(table), "pitch": _pitch(table, um_per_px)}
                log(describe(ref, reg, len(off_tissue), off_before, len(table)))
            np.save(crops_file(tmp, name), np.concatenate(crops))
            meta["crops"][name] = [r.name for r in split_refs]
            spots = pd.concat(rows, ignore_index=True)
            front = ["slide", "spot", "x", "y"]
            spots = spots[front + [c for c in spots.columns if c not in front]]
            spots.to_csv(spots_file(tmp, name), index=False)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def _registration_record(reg: Registration, off_tissue: np.ndarray, off_before: int) -> dict:
    record = {"source": reg.source}  # the offset itself: meta["offsets"]
    if reg.source == "estimated":
        record.update(best_shift=list(reg.candidate), cv_r2=round(reg.r2, 4),
                      cv_r2_unshifted=round(reg.r2_unshifted, 4), gain=round(reg.gain, 4),
                      cv_r2_chance=round(reg.null_r2, 4))
    record["off_tissue_before_shift"] = off_before
    record["off_tissue_spots"] = off_tissue.tolist()  # rows of the slide's spot table, after the shift
    return record


def crop_test_slides(h5_path: Path, normalizer: StainNormalizer, patch_size: int, targets: list[str],
                     log=print) -> PatchSet:
    """Every Test slide of a user's file, stain-normalized and cropped as the training data was, in memory."""
    validate_file(h5_path, need_train=False)
    slides, tables, sizes = [], [], {}
    with open_h5(h5_path) as h5:
        um_per_px = read_um_per_px(h5)
        refs = [r for r in slide_refs(h5) if r.split == "Test"]
        if not refs:
            raise InputError(f"{h5_path}: no Test slides under images/Test to predict")
        for ref in refs:
            image = normalizer.transform(read_image_uint8(h5, ref))
            spots = read_spots(h5, ref)
            slides.append((image, spots["x"].to_numpy(), spots["y"].to_numpy(), (0, 0)))
            table = pd.DataFrame({"slide": ref.name, "spot": np.arange(len(spots)), "x": spots["x"], "y": spots["y"]})
            barcodes, fullres = read_barcodes(h5, ref), read_fullres(h5, ref)
            if barcodes is not None:
                table["barcode"] = barcodes
            if fullres is not None:
                table["x_fullres"], table["y_fullres"] = fullres[0][:, 0], fullres[0][:, 1]
            tables.append(table)
            sizes[ref.name] = image.shape[:2]
            log(f"normalized {len(spots)} spots of Test/{ref.name}")
    return PatchSet(SlideCrops.from_slides(slides, patch_size), pd.concat(tables, ignore_index=True),
                    list(targets), sizes, patch_size, um_per_px)
