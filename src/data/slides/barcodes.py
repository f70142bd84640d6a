"""Barcodes of a deconvolution table matched to a slide's spots as real tables hold them.

Tables written by other tools rarely repeat Space Ranger's barcodes exactly: ``anndata.concat`` and
multi-sample scripts put a sample name before (``A1_AAACAAGTATCTCCCA-1``) or after the barcode
(``AAACAAGTATCTCCCA-1-A1``), R exports drop the ``-1`` suffix, and filters remove spots. The rules below
are tried in order, and the first that matches the most rows is used (and named in the import's report):
the barcode as written; without a ``-N`` suffix on either side; the 16-letter barcode found inside a
longer name. A rule under which two rows or two spots would read alike is not used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SUFFIX = re.compile(r"-\d+$")
SEQUENCE = re.compile(r"[ACGTN]{16}")  # a 10x Visium spot barcode
RULES = ("as written", "without the -N suffix", "the 16-letter barcode inside a sample prefix or suffix")


@dataclass(frozen=True)
class BarcodeMatch:
    spot: np.ndarray  # per table row: the index of its spot in ``listed``, or -1
    rule: str

    @property
    def matched(self) -> int:
        return int((self.spot >= 0).sum())


def _key(barcode: str, rule: int) -> str | None:
    if rule == 0:
        return barcode
    if rule == 1:
        return SUFFIX.sub("", barcode)
    found = SEQUENCE.findall(barcode)
    return found[0] if len(found) == 1 else None


def match_barcodes(table: list[str], listed: list[str]) -> BarcodeMatch:
    """Each table row's spot among ``listed`` (every spot the slide lists), by the best rule."""
    best = BarcodeMatch(np.full(len(table), -1), RULES[0])
    for rule, name in enumerate(RULES):
        spot_keys = [_key(b, rule) for b in listed]
        row_keys = [_key(b, rule) for b in table]
        known = [k for k in spot_keys if k is not None]
        named = [k for k in row_keys if k is not None]
        if len(set(known)) < len(known) or len(set(named)) < len(named):
            continue  # two spots (or rows) alike under this rule: it cannot tell them apart
        where = {k: i for i, k in enumerate(spot_keys) if k is not None}
        spot = np.array([where.get(k, -1) if k is not None else -1 for k in row_keys], dtype=np.int64)
        candidate = BarcodeMatch(spot, name)
        if candidate.matched > best.matched:
            best = candidate
        if best.matched == len(table):
            break
    return best
