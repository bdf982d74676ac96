"""stages/bnfold.py: a frozen encoder's BatchNorms folded into its convolutions compute the same function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repblend.stages.bnfold import fold_batchnorm, same_function
from repblend.stages.encoders import HALF, ImageEncoder, ImagePreprocess

SIZE = 32


def _randomise_norms(model: nn.Module) -> nn.Module:
    """Pretrained-looking statistics and affine maps, so that folding has something to get wrong."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def _timm_lite0() -> nn.Module:
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    return _randomise_norms(model).double()


def test_every_batchnorm_of_a_timm_efficientnet_folds_to_the_same_features_and_pixel_gradients():
    model = _timm_lite0()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded, pairs = fold_batchnorm(model)
    assert len(pairs) == norms == 49
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert model.state_dict().keys() == before.keys()  # the original keeps its BatchNorms (LoRS trains them)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())

    x = torch.randn(3, 3, SIZE, SIZE, dtype=torch.float64, requires_grad=True)
    want = model(x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    got = folded(x)
    (got_grad,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-10)


class _NormFirst(nn.Module):
    """Registers conv then norm but runs the norm first: registration order is not execution order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x)).mean(dim=(2, 3))


def test_a_fold_that_changes_the_function_is_caught_and_the_encoder_runs_unfolded():
    torch.manual_seed(0)
    model = _randomise_norms(_NormFirst())
    folded, pairs = fold_batchnorm(model)
    assert pairs == [("conv", "norm")] and not same_function(model, folded, SIZE)

    encoder = ImageEncoder("norm-first", model, 3, ImagePreprocess(image_size=SIZE, mean=HALF, std=HALF))
    assert encoder.folded is None and encoder.folded_batchnorms == 0
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(encoder(x), model(x), rtol=0, atol=0)


def test_the_image_encoder_runs_its_folded_copy():
    model = _timm_lite0().float()
    preprocess = ImagePreprocess(image_size=SIZE, mean=HALF, std=HALF)
    encoder = ImageEncoder("lite0-random", model, model.num_features, preprocess)
    assert encoder.folded_batchnorms == 49 and encoder.folded is not None
    assert any(isinstance(m, nn.BatchNorm2d) for m in encoder.backbone.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    x = torch.randn(2, 3, SIZE, SIZE)
    want = encoder.backbone(x)
    assert (encoder(x) - want).abs().max() <= 1e-4 * want.abs().max()  # float32 rounding of a 49-layer fold
    encoder.folded.apply(lambda m: setattr(m, "bias", None) if isinstance(m, nn.Conv2d) else None)
    assert (encoder(x) - want).abs().max() > 1e-2 * want.abs().max()  # forward really runs the folded copy


def test_an_encoder_without_batchnorm_has_nothing_folded_and_no_copy():
    from repblend.stages.encoders import build_image_encoder

    encoder = build_image_encoder("tiny", "random", SIZE)
    assert encoder.folded is None and encoder.folded_batchnorms == 0
    assert fold_batchnorm(encoder.backbone) == (encoder.backbone, [])
