"""The wavelet transform behind DiffuseHigh's structure guidance: exact, and PyWavelets' own numbers."""
import math

import pytest
import torch

from pipelines.dwt import WAVELETS, dwt2, filter_bank, idwt2, low_band

SIZES = [(32, 32), (33, 17), (64, 48), (5, 7), (1, 3)]


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("size", SIZES)
def test_perfect_reconstruction(wavelet, size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    ll, highs = dwt2(x, wavelet)
    assert ll.dtype == torch.float32 and highs.shape == (2, 3, 3) + ll.shape[-2:]
    taps = len(filter_bank(wavelet)[0])
    assert ll.shape[-2:] == ((size[0] + taps - 1) // 2, (size[1] + taps - 1) // 2)  # PyWavelets' length rule
    assert torch.allclose(idwt2(ll, highs, size, wavelet), x, atol=1e-5)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_filters_are_an_orthonormal_pair(wavelet):
    dec_lo, dec_hi, rec_lo, rec_hi = filter_bank(wavelet)
    assert math.isclose(float(rec_lo.sum()), math.sqrt(2), abs_tol=1e-12)
    assert math.isclose(float(rec_lo.pow(2).sum()), 1.0, abs_tol=1e-12)
    assert abs(float((dec_lo * dec_hi).sum())) < 1e-12


def test_low_band_of_a_constant_is_the_constant_times_two():
    # An orthonormal 2-D low-pass has gain sqrt(2) per axis; symmetric padding keeps edges constant too.
    assert torch.allclose(low_band(torch.full((1, 1, 12, 10), 0.25)), torch.full((1, 1, 9, 8), 0.5), atol=1e-6)


def test_unknown_wavelet_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown wavelet 'db9'"):
        dwt2(torch.zeros(1, 1, 8, 8), "db9")


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("size", SIZES)
def test_equals_pywavelets(wavelet, size):
    pywt = pytest.importorskip("pywt", reason="PyWavelets (dev extra) is the reference")
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ll, highs = dwt2(x, wavelet)
    ref_ll, ref_highs = pywt.dwt2(x.numpy(), wavelet, mode="symmetric")
    assert torch.allclose(ll.double(), torch.from_numpy(ref_ll), atol=1e-5)
    for ours, theirs in zip(highs.unbind(dim=2), ref_highs):  # cH, cV, cD
        assert torch.allclose(ours.double(), torch.from_numpy(theirs), atol=1e-5)
    ref_x = pywt.idwt2((ref_ll, ref_highs), wavelet, mode="symmetric")[..., : size[0], : size[1]]
    assert torch.allclose(idwt2(ll, highs, size, wavelet).double(), torch.from_numpy(ref_x), atol=1e-5)
    wave = pywt.Wavelet(wavelet)
    for ours, theirs in zip(filter_bank(wavelet), (wave.dec_lo, wave.dec_hi, wave.rec_lo, wave.rec_hi)):
        assert torch.allclose(ours, torch.tensor(theirs, dtype=torch.float64), atol=1e-12)
