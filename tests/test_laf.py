"""LocalFeatures <-> kornia local affine frames, on real DSM features."""
import dataclasses

import kornia.feature as KF
import pytest
import torch

from gpu_dsm.detect import DSMDetector
from gpu_dsm.extract import ExtractConfig, extract_activations
from gpu_dsm.laf import features_to_laf, laf_to_features
from gpu_dsm.visualize import feature_to_image


@pytest.fixture(scope="module")
def real(lite0, mini):
    cfg = ExtractConfig(image_size=512, progress=False)
    specs = [mini.database_specs()[0], mini.query_specs()[1]]
    maps = extract_activations(lite0, specs, cfg)
    features = DSMDetector.from_backbone(lite0)(maps, scales=cfg.scales)
    from gpu_dsm.images import target_size

    sizes = torch.tensor([target_size(s, cfg.image_size, cfg.upscale) for s in specs])  # (width, height)
    assert int(features.counts.min()) > 50
    return features, sizes


def test_round_trip_and_kornia_geometry(real):
    features, sizes = real
    for radius in (1.0, 2.0):
        laf = features_to_laf(features, sizes, radius)
        assert laf.shape == (2, features.capacity, 2, 3)
        KF.KORNIA_CHECK_LAF(laf)
        back = laf_to_features(laf, features, sizes, radius)
        v = features.valid
        torch.testing.assert_close(back.xy[v], features.xy[v], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(back.frame[v], features.frame[v], rtol=1e-4, atol=1e-5)
        # kornia reads the centre we meant, and its outline is our ellipse at that radius
        for b in range(2):
            rows = v[b].nonzero().squeeze(1)
            for s in features.scale[b, rows].unique().tolist():
                sel = rows[features.scale[b, rows] == s]
                xy, frame = feature_to_image(features.xy[b, sel], features.frame[b, sel], features.map_sizes[b, s].tolist(),
                                             sizes[b].tolist())
                torch.testing.assert_close(KF.get_laf_center(laf[b:b + 1, sel])[0], xy, rtol=1e-5, atol=1e-4)
                points = KF.laf_to_boundary_points(laf[b:b + 1, sel], n_pts=12)[0, :, 1:]  # (n, 11, 2): 0 is the centre
                cov = frame @ frame.transpose(-1, -2)
                d = points - xy[:, None]
                mahalanobis = torch.einsum("npi,nij,npj->np", d, torch.linalg.inv(cov), d)
                torch.testing.assert_close(mahalanobis, torch.full_like(mahalanobis, radius**2), rtol=1e-3, atol=1e-3)


def test_kornia_ellipses_and_rotations_agree(real):
    features, sizes = real
    laf = features_to_laf(features, sizes)
    v = features.valid
    # the same ellipse written as kornia's [x, y, a, b, c] conic gives the same LAF
    cov = laf[..., :2] @ laf[..., :2].transpose(-1, -2)
    conic = torch.linalg.inv(torch.where(v[..., None, None], cov, torch.eye(2).expand_as(cov)))
    ells = torch.stack([laf[..., 0, 2], laf[..., 1, 2], conic[..., 0, 0], conic[..., 0, 1], conic[..., 1, 1]], -1)
    torch.testing.assert_close(KF.ellipse_to_laf(ells)[v], laf[v], rtol=1e-4, atol=1e-4)
    # a LAF rotated by kornia describes the same ellipse: converting back gives the same upright frame
    rotated = KF.rotate_laf(laf, torch.full(laf.shape[:2] + (1,), 37.0))
    back = laf_to_features(rotated, features, sizes)
    torch.testing.assert_close(back.frame[v], features.frame[v], rtol=1e-4, atol=1e-4)


def test_bad_inputs(real):
    features, sizes = real
    with pytest.raises(ValueError, match=r"image_sizes \(width, height per image\) must have shape \(2, 2\)"):
        features_to_laf(features, sizes[:1])
    with pytest.raises(ValueError, match="positive"):
        features_to_laf(features, torch.zeros(2, 2))
    laf = features_to_laf(features, sizes)
    with pytest.raises(ValueError, match="laf must have shape"):
        laf_to_features(laf[:, :3], features, sizes)
    degenerate = laf.clone()
    degenerate[0, 0, :, :2] = 0
    with pytest.raises(ValueError, match="degenerate"):
        laf_to_features(degenerate, features, sizes)
    empty = dataclasses.replace(features, valid=torch.zeros_like(features.valid))
    assert features_to_laf(empty, sizes).abs().sum() == 0
