import pytest
import torch
import torch.nn.functional as F

from gpu_dsm.whitening import Whitening, fit_pca_whitening, fit_supervised_whitening


def _clustered(n=400, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, d, generator=g) * torch.linspace(3, 0.1, d)
    labels = torch.randint(0, 20, (n,), generator=g)
    x = centres[labels] + 0.3 * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=-1), labels


def test_pca_whitening_decorrelates_the_training_set():
    x, _ = _clustered()
    w = fit_pca_whitening(x)
    y = x.double() @ w.projection.double().T + w.bias.double()
    cov = (y.T @ y) / len(y)
    torch.testing.assert_close(cov, torch.eye(w.output_dim, dtype=torch.float64), atol=1e-3, rtol=0)
    assert y.mean(0).abs().max() < 1e-4
    assert w.apply(x, dim=8).shape == (len(x), 8)


def test_pca_dim_is_limited_by_rank():
    x = F.normalize(torch.randn(5, 32), dim=-1)
    assert fit_pca_whitening(x).output_dim <= 4


def test_supervised_whitening_whitens_pair_differences():
    x, labels = _clustered()
    q, p = [], []
    for i in range(len(x)):
        same = (labels == labels[i]).nonzero().flatten()
        q.append(i)
        p.append(int(same[(same != i).nonzero()[0]]) if len(same) > 1 else i)
    q, p = torch.tensor(q), torch.tensor(p)
    w = fit_supervised_whitening(x, q, p)
    diff = (x[q] - x[p]).double() @ w.projection.double().T
    intra = diff.T @ diff / len(q)
    torch.testing.assert_close(intra, torch.eye(x.shape[1], dtype=torch.float64), atol=1e-3, rtol=0)
    # matching pairs get closer relative to non-matching ones than without whitening
    y = w.apply(x)

    def gap(z):
        sim = z @ z.T
        same = labels[:, None] == labels[None]
        return (sim[same].mean() - sim[~same].mean()).item()

    assert gap(y) > gap(x) * 0.5 and torch.isfinite(y).all()


def test_save_load_and_bad_files(tmp_path):
    x, _ = _clustered()
    w = fit_pca_whitening(x, dim=10)
    w.save(tmp_path / "w.pt")
    loaded = Whitening.load(tmp_path / "w.pt")
    torch.testing.assert_close(loaded.apply(x), w.apply(x))
    assert loaded.method == "pca"
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read whitening file"):
        Whitening.load(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        Whitening.load(tmp_path / "none.pt")
    with pytest.raises(ValueError, match=r"expects descriptors of shape \(N, 16\)"):
        w.apply(torch.randn(3, 8))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fit_pca_whitening(torch.full((4, 3), float("nan")))
