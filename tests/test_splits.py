import numpy as np
import pytest
from pydantic import ValidationError

from src.core.errors import InputError
from src.core.sections import CVConfig
from src.data.spatial import COMPETITION_UM_PER_PX, SPOT_RADIUS, balanced_blocks, slide_pitches
from src.engine.folds import make_folds


def _lattice(n_side=30, pitch=25.0):
    xs, ys = np.meshgrid(np.arange(n_side) * pitch, np.arange(n_side) * pitch)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _cfg(**changes):
    base = dict(scheme="blocks", n_folds=3, blocks_per_fold=1, buffer=0.0, seed=0)
    return CVConfig(**{**base, **changes})


def test_blocks_are_balanced_and_contiguous():
    xy = _lattice()
    labels = balanced_blocks(xy, 5)
    counts = np.bincount(labels)
    assert counts.max() - counts.min() <= 1
    for k in range(5):  # contiguous: a block's bounding box holds no other block's spot
        box = xy[labels == k]
        inside = ((xy >= box.min(0)) & (xy <= box.max(0))).all(axis=1)
        assert (labels[inside] == k).all()


def _folds(xy, slides, cfg, patch_size):
    return make_folds(xy, slides, cfg, patch_size, slide_pitches(xy, slides, COMPETITION_UM_PER_PX),
                      COMPETITION_UM_PER_PX)


@pytest.mark.parametrize("patch_size, buffer", [(64, 0.0), (128, 0.4)])
def test_no_validation_spot_lies_within_a_patch_of_a_kept_training_spot(patch_size, buffer):
    xy = np.concatenate([_lattice(), _lattice(20)])
    slides = np.array(["S_1"] * 900 + ["S_2"] * 400)
    folds = _folds(xy, slides, _cfg(buffer=buffer), patch_size)
    assert len(folds) == 3
    reach = patch_size / 2 + SPOT_RADIUS + buffer * 25.0
    for fold in folds:
        assert fold.dropped > 0 and len(np.intersect1d(fold.train, fold.val)) == 0
        for slide in ("S_1", "S_2"):
            train = xy[fold.train[slides[fold.train] == slide]]
            val = xy[fold.val[slides[fold.val] == slide]]
            chebyshev = np.abs(train[:, None, :] - val[None, :, :]).max(axis=2)
            assert chebyshev.min() >= reach
    every = np.sort(np.concatenate([f.val for f in folds]))
    np.testing.assert_array_equal(every, np.arange(len(xy)))  # each spot validated exactly once
    sizes = [len(f.val) for f in folds]
    assert max(sizes) - min(sizes) <= 2  # balanced in spot count


def test_larger_buffer_drops_more_and_blocks_per_fold_change_the_folds():
    xy, slides = _lattice(), np.array(["S_1"] * 900)
    small = _folds(xy, slides, _cfg(), 64)
    large = _folds(xy, slides, _cfg(buffer=2.0), 64)
    assert sum(f.dropped for f in large) > sum(f.dropped for f in small)
    finer = _folds(xy, slides, _cfg(blocks_per_fold=3), 64)
    assert not np.array_equal(finer[0].val, small[0].val)


def test_leave_one_slide_out_needs_no_buffer():
    xy = np.concatenate([_lattice(10), _lattice(10)])
    slides = np.array(["S_1"] * 100 + ["S_2"] * 100)
    folds = _folds(xy, slides, _cfg(scheme="leave_one_slide_out"), 64)
    assert [set(slides[f.val]) for f in folds] == [{"S_1"}, {"S_2"}]
    assert all(f.dropped == 0 and len(f.train) == 100 for f in folds)
    with pytest.raises(InputError, match="at least 2 training slides"):
        _folds(xy[:100], slides[:100], _cfg(scheme="leave_one_slide_out"), 64)
    with pytest.raises(ValidationError, match="'blocks' or 'leave_one_slide_out'"):
        _cfg(scheme="random")  # a section refuses it when it is made
