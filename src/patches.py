"""Stage ``patches``: a square uint8 patch around every spot, with its spot table.

Output folder (DVC-tracked), read by ``src.data.load_patch_set`` as one N x P x P x 3 array per split:
``{train,test}_slides/``   each normalized slide once, reflect-padded (memory-mappable .npy): a patch is
                           a crop of its slide, so the folder does not grow with the patch size
                           (``src.patch_store``)
``{train,test}_crops.npy`` N x 3 int32: the slide (its place in ``meta.json``'s ``crops``), top, left
``{train,test}_spots.csv`` one row per patch: slide, spot (row in the slide's table), x, y, then the
                           cell-type columns (train) or the remaining fields such as Test_Set (test)
``meta.json``              patch size, each slide's offset and how it was found (README "Registration"),
                           cell-type names, slide sizes, slide order per split
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from src.config import PatchesConfig, add_params_arguments, load_params
from src.errors import InputError, exit_on_input_error
from src.io_utils import atomic_path
from src.normalize import SLIDES_FILE
from src.patch_store import crop_corners, padded_slide
from src.registration import MIN_SPOTS, Registration, estimate_offset, tissue_cover, tissue_fraction
from src.slides import SlideRef, open_h5, read_image_uint8, read_spots, slide_refs, target_names

META_FILE = "meta.json"


REGISTRATION_MODES = ("auto", "none")
OFF_TISSUE = 0.5  # a spot whose disc is less than half tissue after correction is "off tissue"


def check_config(cfg: PatchesConfig, refs: list[SlideRef]) -> None:
    if cfg.size < 8:
        raise InputError(f"params: patches.size = {cfg.size}: must be at least 8 px")
    if cfg.registration not in REGISTRATION_MODES:
        raise InputError(f"params: patches.registration = {cfg.registration!r}: choose auto or none")
    if cfg.max_shift_px < 0:
        raise InputError(f"params: patches.max_shift_px = {cfg.max_shift_px}: must be >= 0")
    names = {r.name for r in refs}
    for slide, offset in cfg.offsets.items():
        if slide not in names:
            raise InputError(f"params: patches.offsets.{slide}: no such slide ({', '.join(sorted(names))})")
        if len(offset) != 2:
            raise InputError(f"params: patches.offsets.{slide} = {offset}: expected [dx, dy]")


def register_slide(image: np.ndarray, ref: SlideRef, table: pd.DataFrame, targets: list[str],
                   cfg: PatchesConfig) -> Registration:
    """The offset of one slide: hand-set, estimated (training slides), or none."""
    if ref.name in cfg.offsets:
        return Registration(tuple(int(v) for v in cfg.offsets[ref.name]), "set")
    if ref.split != "Train" or cfg.registration == "none":
        return Registration((0, 0), "none")
    if len(table) < MIN_SPOTS:
        return Registration((0, 0), f"not estimated: {len(table)} spots, fewer than {MIN_SPOTS}")
    return estimate_offset(image, table["x"].to_numpy(), table["y"].to_numpy(),
                           table[targets].to_numpy(np.float64), cfg.max_shift_px)


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
        check_config(cfg, refs)
        meta = {"size": cfg.size, "offsets": {}, "registration": {}, "targets": [], "slides": {}, "crops": {}}
        for split in ("Train", "Test"):
            split_refs = [r for r in refs if r.split == split]
            tables = [read_spots(h5, r) for r in split_refs]
            if sum(len(t) for t in tables) == 0:
                continue
            if split == "Train":
                meta["targets"] = target_names(list(tables[0].columns))
            name = split.lower()
            (tmp / f"{name}_slides").mkdir()
            rows, crops = [], []
            for number, (ref, table) in enumerate(zip(split_refs, tables)):
                image = read_image_uint8(h5, ref)
                reg = register_slide(image, ref, table, meta["targets"], cfg)
                x, y = table["x"].to_numpy(), table["y"].to_numpy()
                slide, pad = padded_slide(image, cfg.size, reg.offset)
                np.save(tmp / f"{name}_slides" / f"{ref.name}.npy", slide)
                corners = crop_corners(x, y, cfg.size, reg.offset, pad)
                crops.append(np.column_stack([np.full(len(table), number), corners]).astype(np.int32))
                cover = tissue_cover(image)
                off_tissue = np.flatnonzero(tissue_fraction(cover, x + reg.offset[0], y + reg.offset[1]) < OFF_TISSUE)
                off_before = int((tissue_fraction(cover, x, y) < OFF_TISSUE).sum())
                rows.append(table.assign(slide=ref.name, spot=np.arange(len(table))))
                meta["offsets"][ref.name] = list(reg.offset)
                meta["registration"][ref.name] = _registration_record(reg, off_tissue, off_before)
                meta["slides"][ref.name] = {"split": split, "height": image.shape[0],
                                            "width": image.shape[1], "n_spots": len(table)}
                log(describe(ref, reg, len(off_tissue), off_before, len(table)))
            np.save(tmp / f"{name}_crops.npy", np.concatenate(crops))
            meta["crops"][name] = [r.name for r in split_refs]
            spots = pd.concat(rows, ignore_index=True)
            front = ["slide", "spot", "x", "y"]
            spots = spots[front + [c for c in spots.columns if c not in front]]
            spots.to_csv(tmp / f"{name}_spots.csv", index=False)
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


@exit_on_input_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.patches", description=__doc__.split("\n")[0])
    parser.add_argument("--normalized", type=Path, default=Path("data/normalized") / SLIDES_FILE,
                        help="normalized slides (output of the normalize stage)")
    parser.add_argument("--out", type=Path, default=Path("data/patches"), help="output folder")
    add_params_arguments(parser, "patches.size=128")
    args = parser.parse_args(argv)
    params = load_params(args.params, args.set)
    extract_patches(args.normalized, args.out, params.patches)


if __name__ == "__main__":
    main()
