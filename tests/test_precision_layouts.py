"""Half-precision models and channels_last inputs: statistics accumulate in float64 and are
written back in each buffer's own dtype; the exact estimator still reads a shift of ~1."""

from __future__ import annotations

import pytest
import torch

import varshift
import dist_helpers as H


def reference(exact: bool) -> dict[str, torch.Tensor]:
    fixed, _ = varshift.recalibrate(H.model(), H.batches(), exact=exact)
    return {k: v for k, v in fixed.state_dict().items() if "running" in k}


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_model(dtype: torch.dtype, tol: float) -> None:
    model = H.model().to(dtype)
    data = [(x.to(dtype), y) for x, y in H.batches()]
    fixed, rep = varshift.recalibrate(model, data, exact=True)
    recalibrated = [l for l in rep.layers if l.recalibrated]
    assert recalibrated and all(abs(l.shift_after - 1) < tol for l in recalibrated)
    want = reference(exact=True)
    for key, value in fixed.state_dict().items():
        if "running" in key:
            assert value.dtype == dtype  # written back in the buffer's own dtype
            # the half model computes its activations in half: compare loosely with float32
            torch.testing.assert_close(value.float(), want[key], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("exact", [False, True])
def test_channels_last_inputs_give_the_same_statistics(exact: bool) -> None:
    model = H.model().to(memory_format=torch.channels_last)
    data = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in H.batches()]
    fixed, _ = varshift.recalibrate(model, data, exact=exact)
    want = reference(exact)
    for key, value in fixed.state_dict().items():
        if "running" in key:
            torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-7)
