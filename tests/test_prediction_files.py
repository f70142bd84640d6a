"""The predicted .h5ad as the field reads it: squidpy's and scanpy's spatial plots draw it with their
defaults, the spots where the tissue is, on the images the file carries."""
import matplotlib

matplotlib.use("Agg")  # the plotting libraries draw through pyplot; no screen here

import anndata  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from src.data.slides.prediction_files import HIRES, LOWRES, SlideSource, write_prediction_h5ad  # noqa: E402

NAMES = ["B cells", "T cells", "Tumour"]


def _slide(height=2400, width=3000):
    """Tissue (dark) in a disc at the centre of a bright slide, spots on a grid over the whole slide."""
    yy, xx = np.mgrid[:height, :width]
    tissue = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 < (height / 3) ** 2
    image = np.full((height, width, 3), 240, np.uint8)
    image[tissue] = (120, 60, 140)
    ys, xs = np.mgrid[100:height:200, 100:width:200]
    spots = pd.DataFrame({"slide": "A1", "spot": np.arange(xs.size), "x": xs.ravel().astype(float),
                          "y": ys.ravel().astype(float)})
    inside = tissue[spots["y"].astype(int), spots["x"].astype(int)]
    pred = np.where(inside[:, None], 5.0, 0.01) * np.array([1.0, 2.0, 3.0])
    return image, spots, pred, inside


@pytest.mark.parametrize("imported", [False, True])
def test_squidpy_and_scanpy_draw_the_predictions_over_the_tissue_with_their_defaults(tmp_path, imported):
    import scanpy as sc
    import squidpy as sq

    image, spots, pred, inside = _slide()
    source = SlideSource(image=image, spot_diameter=80.0, library_id="A1_lib" if imported else "")
    if imported:  # source pixels at twice the pipeline's resolution, barcodes, Space Ranger's own factors
        spots = spots.assign(barcode=[f"AAAC{i:06d}-1" for i in range(len(spots))],
                             x_fullres=spots["x"] * 2, y_fullres=spots["y"] * 2)
        source = SlideSource(image=image, scale=0.5, spot_diameter=80.0, library_id="A1_lib",
                             scalefactors={"spot_diameter_fullres": 161.0, "tissue_hires_scalef": 0.1,
                                           "fiducial_diameter_fullres": 240.0})
    path = tmp_path / "p.h5ad"
    write_prediction_h5ad(path, spots, pred, NAMES, {"A1": source})
    adata = anndata.read_h5ad(path)
    library = "A1_lib" if imported else "A1"
    entry = adata.uns["spatial"][library]
    hires, lowres = entry["images"]["hires"], entry["images"]["lowres"]
    assert max(hires.shape[:2]) == HIRES and max(lowres.shape[:2]) == LOWRES
    factors = entry["scalefactors"]
    # the spots land on the tissue of the stored images, as scanpy places them
    for name, picture in (("hires", hires), ("lowres", lowres)):
        xy = np.rint(adata.obsm["spatial"] * factors[f"tissue_{name}_scalef"]).astype(int)
        dark = picture[xy[:, 1].clip(0, picture.shape[0] - 1), xy[:, 0].clip(0, picture.shape[1] - 1)].mean(1) < 200
        assert (dark == inside).mean() > 0.97, name
    assert factors["spot_diameter_fullres"] == (161.0 if imported else 80.0)
    assert "training table" in adata.uns["predicted_abundance"]["scale"]
    assert list(adata.obs["library_id"].unique()) == [library]

    for draw in (lambda: sq.pl.spatial_scatter(adata, color="Tumour"),
                 lambda: sc.pl.spatial(adata, color="Tumour", show=False)):
        plt.close("all")
        draw()
        axes = [ax for ax in plt.gcf().axes if ax.images]
        assert axes, "no tissue image drawn"
        ax = axes[0]
        assert ax.images[0].get_array().shape[:2] == hires.shape[:2]  # the hires image, by default
        spots_drawn = max(ax.collections, key=lambda c: len(c.get_paths()))  # one circle per spot
        centres = np.array([path.get_extents().get_points().mean(0) for path in spots_drawn.get_paths()])
        assert len(centres) == len(spots)
        assert (centres >= 0).all() and (centres[:, 0] <= hires.shape[1]).all() and \
            (centres[:, 1] <= hires.shape[0]).all()
        at = np.rint(centres).astype(int)
        on_tissue = hires[at[:, 1].clip(0, hires.shape[0] - 1), at[:, 0].clip(0, hires.shape[1] - 1)].mean(1) < 200
        assert on_tissue.sum() == pytest.approx(inside.sum(), abs=3)  # the tissue's spots, on the tissue
    plt.close("all")
