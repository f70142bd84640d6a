"""Stage ``patches``: a square uint8 patch around every spot, memory-mappable, with its spot table.

Output folder (DVC-tracked):
``{train,test}.npy``       N x P x P x 3 uint8 (``np.load(..., mmap_mode="r")``)
``{train,test}_spots.csv`` one row per patch: slide, spot (row in the slide's table), x, y, then the
                           cell-type columns (train) or the remaining fields such as Test_Set (test)
``meta.json``              patch size, offsets, cell-type names, slide sizes
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
from src.slides import SlideRef, open_h5, read_image_uint8, read_spots, slide_refs, target_names

META_FILE = "meta.json"


def crop_patches(image: np.ndarray, x: np.ndarray, y: np.ndarray, size: int,
                 offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Patches of ``size`` px centred on (x + dx, y + dy), reflect-padded at the borders: N x P x P x C.

    The centre pixel is at index ``size // 2``, as in the seed's ``img[y-h:y+h, x-h:x+h]``.
    """
    dx, dy = offset
    half = size // 2
    pad = size + max(abs(dx), abs(dy))
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    rows = np.asarray(y) + dy + pad - half
    cols = np.asarray(x) + dx + pad - half
    out = np.empty((len(rows), size, size, image.shape[2]), dtype=image.dtype)
    for i, (r, c) in enumerate(zip(rows, cols)):
        out[i] = padded[r : r + size, c : c + size]
    return out


def check_offsets(cfg: PatchesConfig, refs: list[SlideRef]) -> None:
    names = {r.name for r in refs}
    for slide, offset in cfg.offsets.items():
        if slide not in names:
            raise InputError(f"params: patches.offsets.{slide}: no such slide ({', '.join(sorted(names))})")
        if len(offset) != 2:
            raise InputError(f"params: patches.offsets.{slide} = {offset}: expected [dx, dy]")


def extract_patches(normalized: Path, out_dir: Path, cfg: PatchesConfig, log=print) -> None:
    """Write the patch arrays, spot tables and meta for every slide of ``normalized``."""
    if cfg.size < 8:
        raise InputError(f"params: patches.size = {cfg.size}: must be at least 8 px")
    with open_h5(normalized) as h5, atomic_path(out_dir) as tmp:
        tmp.mkdir()
        refs = slide_refs(h5)
        check_offsets(cfg, refs)
        meta = {"size": cfg.size, "offsets": cfg.offsets, "targets": [], "slides": {}}
        for split in ("Train", "Test"):
            split_refs = [r for r in refs if r.split == split]
            tables = [read_spots(h5, r) for r in split_refs]
            total = sum(len(t) for t in tables)
            if total == 0:
                continue
            array = np.lib.format.open_memmap(
                tmp / f"{split.lower()}.npy", mode="w+", dtype=np.uint8,
                shape=(total, cfg.size, cfg.size, 3),
            )
            rows, start = [], 0
            for ref, table in zip(split_refs, tables):
                image = read_image_uint8(h5, ref)
                offset = tuple(cfg.offsets.get(ref.name, (0, 0)))
                x, y = table["x"].to_numpy(), table["y"].to_numpy()
                array[start : start + len(table)] = crop_patches(image, x, y, cfg.size, offset)
                start += len(table)
                rows.append(table.assign(slide=ref.name, spot=np.arange(len(table))))
                meta["slides"][ref.name] = {"split": split, "height": image.shape[0],
                                            "width": image.shape[1], "n_spots": len(table)}
                log(f"cropped {len(table)} patches of {split}/{ref.name}")
            array.flush()
            del array
            spots = pd.concat(rows, ignore_index=True)
            front = ["slide", "spot", "x", "y"]
            spots = spots[front + [c for c in spots.columns if c not in front]]
            spots.to_csv(tmp / f"{split.lower()}_spots.csv", index=False)
            if split == "Train":
                meta["targets"] = target_names(list(tables[0].columns))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


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
