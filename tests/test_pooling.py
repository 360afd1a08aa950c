import math

import pytest
import torch
import torch.nn.functional as F

from gpu_dsm.global_descriptors import global_descriptor
from gpu_dsm.pooling import GeM, MAC, SPoC, gem, mac, multiscale_aggregate, spoc


def test_gem_between_mean_and_max():
    x = torch.rand(2, 5, 7, 9)
    torch.testing.assert_close(gem(x, 1.0), x.mean(dim=(-2, -1)))
    assert torch.allclose(gem(x, 200.0), mac(x), rtol=0.05)
    p3 = gem(x, 3.0)
    assert (p3 >= x.mean(dim=(-2, -1)) - 1e-6).all() and (p3 <= mac(x) + 1e-6).all()
    manual = (x.clamp(min=1e-6) ** 3).mean(dim=(-2, -1)) ** (1 / 3)
    torch.testing.assert_close(p3, manual)


def test_modules_normalise_and_hold_parameters():
    x = torch.rand(3, 4, 5, 6)
    for module, fn in [(MAC(), mac), (SPoC(), spoc), (GeM(3.0), lambda t: gem(t, 3.0))]:
        out = module(x)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
        torch.testing.assert_close(out, F.normalize(fn(x), dim=-1))
    g = GeM(2.0)
    assert [n for n, _ in g.named_parameters()] == ["p"]
    g(x).sum().backward()
    assert g.p.grad is not None and torch.isfinite(g.p.grad).all()


def test_spoc_center_prior_weights_the_centre():
    x = torch.zeros(1, 1, 9, 9)
    centre, corner = x.clone(), x.clone()
    centre[..., 4, 4] = 1
    corner[..., 0, 0] = 1
    assert spoc(centre, center_prior=True) > 10 * spoc(corner, center_prior=True)
    assert spoc(centre) == spoc(corner)


def test_multiscale_is_power_mean_of_normalised_scales():
    maps = [torch.rand(6, 8, 8), torch.rand(6, 6, 6), torch.rand(6, 4, 4)]
    p = 3.0
    expected = sum(F.normalize(gem(m[None], p), dim=-1)[0] ** p for m in maps) / 3
    expected = F.normalize(expected ** (1 / p), dim=0)
    torch.testing.assert_close(global_descriptor(maps, "gem", p), expected)
    mac_expected = F.normalize(sum(F.normalize(mac(m[None]), dim=-1)[0] for m in maps) / 3, dim=0)
    torch.testing.assert_close(global_descriptor(maps, "mac"), mac_expected)
    torch.testing.assert_close(multiscale_aggregate([torch.ones(1, 4)]), torch.full((1, 4), 0.5))


def test_bad_activations_are_named():
    with pytest.raises(ValueError, match="NaN or Inf"):
        global_descriptor([torch.full((3, 4, 4), math.nan)])
    with pytest.raises(ValueError, match="non-empty"):
        global_descriptor([torch.zeros(3, 0, 4)])
    with pytest.raises(ValueError, match="no scales"):
        multiscale_aggregate([])
