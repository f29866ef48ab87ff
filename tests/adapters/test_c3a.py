"""C3A: the FFT forward equals multiplication by the explicit block-circulant matrix; PEFT parity."""

from __future__ import annotations

import warnings

import pytest
import torch

import lowrank
from lowrank.adapters.c3a import GEMM_DFT_MAX_BLOCK, block_circular_conv, dft_matrices
from _structures import adapter_of, check_runs_under_autocast, layer, perturb, x_in


def explicit_block_circulant(kernel: torch.Tensor) -> torch.Tensor:
    """Block (i, j) has rows w_ij, w_ij rolled by 1, by 2, ... (built without any FFT)."""
    m, n, b = kernel.shape
    rows = []
    for i in range(m):
        rows.append(torch.cat([torch.stack([torch.roll(kernel[i, j], k) for k in range(b)]) for j in range(n)], dim=1))
    return torch.cat(rows, dim=0)


def test_fft_forward_equals_circulant_matrix():
    m = layer(32, 48)
    lowrank.adapt(m, "c3a", block_size=8)
    perturb(m)
    a = adapter_of(m)
    C = explicit_block_circulant(a.c3a_kernel.detach())  # (48, 32)
    x = x_in()
    torch.testing.assert_close(m(x), m[0].base_layer(x) + x @ C.T / 32, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.delta_weight(), C / 32, atol=0, rtol=0)  # exact: built by indexing
    # a circulant block: constant along the (cyclic) diagonals
    blk = C[:8, :8]
    assert torch.allclose(blk, torch.roll(torch.roll(blk, 1, 0), 1, 1))


@pytest.mark.parametrize("b", [4, 5, 128])  # DFT as GEMMs (even and odd b) and the FFT path
def test_gradients_match_explicit_matrix(b):
    assert (b <= GEMM_DFT_MAX_BLOCK) == (b != 128)
    k = torch.randn(2, 3, b, requires_grad=True)
    x = torch.randn(2, 5, 3 * b, requires_grad=True)
    add = torch.randn(2, 5, 2 * b, requires_grad=True)
    g = torch.randn(2, 5, 2 * b)
    y = block_circular_conv(x, k, addend=add)
    C = explicit_block_circulant(k.detach())
    torch.testing.assert_close(y, add + x @ C.T, atol=1e-4, rtol=1e-5)
    (y * g).sum().backward()
    k2, x2 = k.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    (x2 @ explicit_block_circulant(k2).T * g).sum().backward()
    torch.testing.assert_close(k.grad, k2.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-4, rtol=1e-5)  # the adjoint: blockcirc(w)ᵀ g
    torch.testing.assert_close(add.grad, g)


def test_custom_backward_passes_gradcheck():
    k = torch.randn(3, 2, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    add = torch.randn(4, 18, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, k, a: block_circular_conv(x, k, addend=a), (x, k, add))


def test_dft_matrices_are_rfft_and_irfft():
    F, G = dft_matrices(8, torch.float64, torch.device("cpu"))
    x = torch.randn(5, 8, dtype=torch.float64)
    X = torch.fft.rfft(x)
    torch.testing.assert_close(x @ F, torch.cat([X.real, X.imag], 1))
    torch.testing.assert_close(torch.cat([X.real, X.imag], 1) @ G, x)


def test_bad_block_size_names_the_module():
    with pytest.raises(lowrank.ShapeError, match="'0'.*48x32"):
        lowrank.adapt(layer(32, 48), "c3a", block_size=5)


def test_peft_parity_and_file_layout(tmp_path):
    peft = pytest.importorskip("peft")
    from conftest import tiny_llama

    ours = tiny_llama()
    lowrank.adapt(ours, "c3a", targets=["q_proj", "v_proj"], block_size=16)
    perturb(ours, scale=1.0)
    lowrank.save_adapter(ours, tmp_path / "c3a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "c3a"))
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)
    # and back: a PEFT-made C3A adapter loads here
    ref.save_pretrained(str(tmp_path / "peft"))
    back = tiny_llama()
    lowrank.load_adapter(back, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_runs_under_autocast():  # the custom Function keeps one dtype inside (in-place batched products)
    check_runs_under_autocast("c3a", "c3a_kernel", block_size=8)
