"""GroupedQuantizer: MGVQ parameter layout, the official tiny fixtures, losses, projector vector."""

import os

import pytest
import torch
import torch.nn.functional as F

import htc_kernels as hk
from tests.shared_data import MGVQ_FIXTURE, MGVQ_FIXTURE_F8

FIXTURE, FIXTURE_F8 = MGVQ_FIXTURE, MGVQ_FIXTURE_F8


def test_state_dict_layout_matches_official():
    q = hk.GroupedQuantizer()  # MGVQ-f16c32-g8
    shapes = {k: tuple(v.shape) for k, v in q.state_dict().items()}
    assert shapes == {
        "embedding.weight": (16384, 4),
        "codebook_used": (8, 65536),
        "embed_prob": (8, 2048),
    }
    assert q.codebook().shape == (8, 2048, 4)
    assert q.codebook().data_ptr() == q.embedding.weight.data_ptr()


@pytest.mark.parametrize("path, groups", [(FIXTURE, 8), (FIXTURE_F8, 4)])
def test_official_tiny_fixture(path, groups):
    safetensors = pytest.importorskip("safetensors.torch")
    if not os.path.exists(path):
        pytest.skip(f"fixture not found: {path}")
    t = safetensors.load_file(path)
    emb = t["quantize.embedding.weight"]
    q = hk.GroupedQuantizer(
        groups=groups,
        codes_per_group=emb.shape[0] // groups,
        dim=emb.shape[1],
        usage_history=t["quantize.codebook_used"].shape[1],
    )
    sd = {k[len("quantize.") :]: v for k, v in t.items() if k.startswith("quantize.")}
    q.load_state_dict(sd, strict=True)
    latent = t["fixture.latent"]
    out = q(latent)
    b, c, h, w = latent.shape
    assert torch.equal(out.indices, t["fixture.indices"].reshape(b, h * w, groups))
    torch.testing.assert_close(out.quant, t["fixture.quant"], rtol=1e-5, atol=1e-6)
    # [B, N, C] input gives the same result.
    out2 = q(latent.flatten(2).transpose(1, 2))
    assert torch.equal(out2.indices, out.indices)
    flat = hk.GroupedQuantizer.flatten_for_projector(out.quant)
    assert flat.shape == (b, c * h * w)
    assert torch.equal(flat, hk.GroupedQuantizer.flatten_for_projector(out2.quant))


def test_projector_vector_size_for_htc():
    q = hk.GroupedQuantizer()
    out = q(torch.randn(2, 32, 21, 21))
    assert out.indices.shape == (2, 441, 8)
    assert hk.GroupedQuantizer.flatten_for_projector(out.quant).shape == (2, 14112)


@pytest.mark.parametrize("l2_norm", [True, False])
def test_losses_and_gradients_match_mgvq(l2_norm):
    """MGVQ: z_q = z + (z_q - z).detach(); codebook loss trains the codebook, commitment loss z."""
    q = hk.GroupedQuantizer(groups=2, codes_per_group=16, dim=4, l2_norm=l2_norm, usage_history=8)
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(3, 8, 5, 5, requires_grad=True)
    out = q(z)
    w = torch.randn_like(out.quant)
    ((out.quant * w).sum() + out.codebook_loss + out.commitment_loss).backward()

    # Dense MGVQ-style reference, float64.
    z2 = z.detach().double().requires_grad_()
    emb = q.embedding.weight.detach().double().requires_grad_()
    tok = z2.flatten(2).transpose(1, 2).reshape(3, 25, 2, 4)
    e = emb.view(2, 16, 4)
    if l2_norm:
        tok, e = F.normalize(tok, dim=-1), F.normalize(e, dim=-1)
        idx = torch.einsum("bngd,gkd->bngk", tok, e).argmax(-1)
    else:
        idx = (tok.unsqueeze(-2) - e).pow(2).sum(-1).argmin(-1)
    zq = e[torch.arange(2), idx]
    vq = F.mse_loss(zq, tok.detach())
    commit = 0.25 * F.mse_loss(zq.detach(), tok)
    zq_st = tok + (zq - tok).detach()
    quant = zq_st.reshape(3, 25, 8).transpose(1, 2).reshape(3, 8, 5, 5)
    ((quant * w.double()).sum() + vq + commit).backward()

    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(out.quant.double(), quant, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.codebook_loss.double(), vq, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.commitment_loss.double(), commit, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad.double(), z2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.embedding.weight.grad.double(), emb.grad, rtol=1e-4, atol=1e-6)


def test_l2_norm_losses_hold_for_huge_latents():
    """Cosine mode is scale-invariant, losses included: at 2^66 (~7e19) F.normalize's float32 norm
    overflows and its unit latents were zero vectors, so the losses measured |code|^2."""
    q = hk.GroupedQuantizer(groups=2, codes_per_group=16, dim=4, l2_norm=True, usage_history=8)
    torch.nn.init.normal_(q.embedding.weight)
    z = torch.randn(2, 8, 3, 3)
    small, huge = q(z), q(z * 2.0**66)  # a power of two: the scaled latents are exact
    assert torch.equal(small.indices, huge.indices)
    assert torch.equal(small.quant, huge.quant)
    torch.testing.assert_close(huge.codebook_loss, small.codebook_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(huge.commitment_loss, small.commitment_loss, rtol=1e-6, atol=0)


def test_bad_inputs():
    q = hk.GroupedQuantizer(groups=2, codes_per_group=4, dim=4, usage_history=8)
    with pytest.raises(ValueError, match="channels, expected groups\\*dim = 8"):
        q(torch.randn(1, 6, 2, 2))
    with pytest.raises(ValueError, match="must be \\[B, C, H, W\\] or \\[B, N, C\\]"):
        q(torch.randn(8, 2))
    with pytest.raises(ValueError, match=">= 1"):
        hk.GroupedQuantizer(groups=2, codes_per_group=0)
