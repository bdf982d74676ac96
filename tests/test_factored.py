"""The factored student (stages/factored.py): the same function as the flat unroll, so the same gradients."""

import dataclasses

import pytest
import torch

from repblend.pipeline.config import DistillConfig
from repblend.pipeline.steps import student_form
from repblend.stages.distill import match_unrolled
from repblend.stages.errors import ConfigError
from repblend.stages.factored import FactoredHead, match_factored
from repblend.stages.heads import HeadSpec
from test_distill import _grads, _problem, _tiny_distiller


@pytest.mark.parametrize("variant", [{"blend": True}, {"blend": False, "noise": 0.5},
                                     {"loss": "clip", "merge_loss_branches": True}])
def test_factored_gradients_equal_the_flat_unroll(variant):
    """float64, 3 student steps of 4 on 7 pairs: every gradient of the synthetic set to rounding."""
    problem = _problem(**variant)
    flat_result, flat = _grads(match_unrolled, *problem)
    factored_result, factored = _grads(match_factored, *problem)
    torch.testing.assert_close(factored_result.loss, flat_result.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(factored_result.loss_img, flat_result.loss_img, rtol=1e-12, atol=0)
    for name in flat:
        torch.testing.assert_close(factored[name], flat[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_factored_head_after_sgd_steps_is_the_flat_head_after_them():
    """Two SGD steps taken on the factors give the flat parameters two explicit steps give, and the same outputs."""
    g = torch.Generator().manual_seed(3)
    spec = HeadSpec(5, 4, 0.0)
    theta = spec.init_flat(g, dtype=torch.float64)
    head = FactoredHead(spec, theta)
    flat = theta.clone().requires_grad_(True)
    for _ in range(2):
        x = torch.randn(3, 5, generator=g, dtype=torch.float64)
        loss_factored = head.forward(x).pow(3).sum()
        head.sgd(list(torch.autograd.grad(loss_factored, head.wrt())), torch.tensor(0.2, dtype=torch.float64))
        loss_flat = spec.apply_flat(flat, x, train=False).pow(3).sum()
        flat = flat - 0.2 * torch.autograd.grad(loss_flat, flat)[0]
        torch.testing.assert_close(loss_factored, loss_flat)
    torch.testing.assert_close(head.flat(), flat)
    x = torch.randn(2, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(head.forward(x), spec.apply_flat(flat, x, train=False))


def test_the_distiller_makes_the_same_set_with_either_student():
    flat, factored = _tiny_distiller(), _tiny_distiller()
    factored.settings = dataclasses.replace(factored.settings, student="factored")
    for _ in range(4):
        flat.step()
        factored.step()
    for a, b in zip(flat.syn.parameters(), factored.syn.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # float32: rounding differs, the function does not


def test_auto_factors_repblend_on_a_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert student_form(DistillConfig(), cpu) == "factored"
    assert student_form(DistillConfig(), cuda) == "flat"
    assert student_form(DistillConfig(grad_mode="tesla"), cpu) == "flat"
    assert student_form(DistillConfig(student="flat"), cpu) == "flat"
    assert student_form(DistillConfig(student="factored"), cuda) == "factored"
    with pytest.raises(ConfigError, match=r"^distill.student=factored .* needs distill.grad_mode=unroll and "
                                          r"distill.mode=repblend \(got tesla, repblend\)"):
        DistillConfig(student="factored", grad_mode="tesla")

