"""Contract tests of SpatialCellModel on random tensors."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from src.core.errors import InputError
from src.model.backbone import backbone_blocks
from src.model.fusion import FUSIONS
from src.model.network import SpatialCellModel
from tests.conftest import fast_params

MODEL = fast_params().model


def _model(**changes) -> SpatialCellModel:
    torch.manual_seed(0)
    return SpatialCellModel(replace(MODEL, **changes), n_outputs=35)


@pytest.mark.parametrize("fusion", sorted(FUSIONS))
def test_every_trainable_parameter_gets_a_gradient_and_frozen_ones_none(fusion):
    model = _model(fusion=fusion, unfrozen_blocks=2).train()
    images, coords = torch.randn(4, 3, 32, 32), torch.rand(4, 2)
    optimizer = torch.optim.SGD([p for group in model.trainable_parameter_groups() for p in group], lr=0.1)
    # timm zero-initialises each residual branch's last norm, so the branch's earlier layers get
    # their first non-zero gradient only after one step; check the second backward pass.
    for _ in range(2):
        optimizer.zero_grad()
        out = model(images, coords)
        assert out.shape == (4, 35) and torch.isfinite(out).all()
        out.square().mean().backward()
        optimizer.step()
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} got no gradient"
        else:
            assert id(param) in backbone_ids and param.grad is None, f"{name} frozen but has a gradient"
    trainable = {id(p) for group in model.trainable_parameter_groups() for p in group}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert (model.coord_encoder is None) == (fusion == "none")


@pytest.mark.parametrize("backbone", ["resnet10t", "convnext_atto", "vit_tiny_patch16_224"])
def test_unfrozen_blocks_grow_trainable_parameters_monotonically(backbone):
    counts = []
    n_blocks = len(backbone_blocks(_model(backbone=backbone, unfrozen_blocks=0).backbone))
    for k in range(n_blocks + 1):
        model = _model(backbone=backbone, unfrozen_blocks=k)
        counts.append(sum(p.numel() for p in model.backbone.parameters() if p.requires_grad))
    assert counts[0] == 0
    assert all(b > a for a, b in zip(counts, counts[1:])), counts
    assert counts[-1] == sum(p.numel() for p in model.backbone.parameters())


def test_frozen_backbone_parts_run_in_eval_mode():
    model = _model(backbone="resnet10t", unfrozen_blocks=1).train()
    frozen_bn = model.backbone.bn1
    stem_norms = [m for n, m in model.backbone.named_modules() if n.startswith("bn1") or n.startswith("conv1.")]
    assert stem_norms and all(not m.training for m in stem_norms)
    last = [m for n, m in model.backbone.named_modules() if n.startswith("layer4") and isinstance(m, torch.nn.BatchNorm2d)]
    assert last and all(m.training for m in last)
    before = frozen_bn.running_mean.clone()
    model(torch.randn(4, 3, 32, 32), torch.rand(4, 2))
    assert torch.equal(before, frozen_bn.running_mean)  # a training step leaves frozen statistics as they were


def test_vit_and_convnext_forward():
    for backbone in ("convnext_atto", "vit_tiny_patch16_224"):
        model = _model(backbone=backbone, input_size=0, unfrozen_blocks=1).eval()
        size = model.preprocessing.input_size
        assert size == 224  # read from the timm data config
        with torch.no_grad():
            assert model(torch.randn(2, 3, size, size), torch.rand(2, 2)).shape == (2, 35)
    assert _model(backbone="vit_tiny_patch16_224").preprocessing.mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet10t", num_classes=0)
    with torch.no_grad():
        source.conv1[0].weight.fill_(0.125)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    model = _model(weights=str(path))
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)
    assert not torch.equal(_model().backbone.conv1[0].weight, source.conv1[0].weight)


def test_bad_model_settings_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="model.fusion = 'sum': choose product, concat, film, gated, none"):
        fast_params("model.fusion=sum")
    with pytest.raises(InputError, match=r"model.unfrozen_blocks = 99: resnet10t has \d+ blocks"):
        _model(unfrozen_blocks=99)
    with pytest.raises(InputError, match="model.weights = .*: file not found"):
        _model(weights=str(tmp_path / "absent.pt"))
    with pytest.raises(InputError, match="model.backbone = 'no_such_net'"):
        _model(backbone="no_such_net")


def test_output_bias_starts_at_the_mean_profile():
    model = _model().eval()
    mean = torch.linspace(0, 3, 35)
    model.init_output_bias(mean)
    with torch.no_grad():
        out = model(torch.randn(8, 3, 32, 32), torch.rand(8, 2))
    assert torch.corrcoef(torch.stack([out.mean(0), mean]))[0, 1] > 0.9


def test_recipes_that_share_fold_backbones_store_them_once_and_load_back_exactly(tmp_path):
    from src.core.sections import InferConfig, LossConfig
    from src.model.checkpoint import load_checkpoint, save_recipes
    from src.model.network import Ensemble

    folds = [_model(), _model()]  # two fold backbones, as a CV's folds train them
    with torch.no_grad():
        folds[1].backbone.conv1[0].weight.add_(1.0)

    def recipe(seed):  # heads trained on the same fold backbones
        members = []
        for fold in folds:
            member = _model(unfrozen_blocks=0)
            member.backbone.load_state_dict(fold.backbone.state_dict())
            with torch.no_grad():
                member.head[-1].weight.normal_(generator=torch.Generator().manual_seed(seed))
            members.append(member)
        return Ensemble(members)

    loss, infer = LossConfig(0.5, 0.1, "log", 1e-6), InferConfig(["identity"], 0.0, 3.0, 64)
    shared = {"targets": [f"C{i}" for i in range(1, 36)], "patch_size": 32, "stain": {},
              "rank_scale": np.linspace(-20, 1, 35).tolist()}
    recipes = [recipe(1), recipe(2)]
    save_recipes(tmp_path / "one.pt", [(recipes[0], loss, infer, 1.0)], **shared)
    save_recipes(tmp_path / "two.pt", [(r, loss, infer, 0.5) for r in recipes], **shared)
    assert (tmp_path / "two.pt").stat().st_size < 1.1 * (tmp_path / "one.pt").stat().st_size
    loaded, _ = load_checkpoint(tmp_path / "two.pt")
    for saved, back in zip(recipes, loaded.models):
        for a, b in zip(saved.members, back.members):
            assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert not torch.equal(loaded.models[0].members[0].head[-1].weight, loaded.models[1].members[0].head[-1].weight)
