"""Process-level behaviour: lazy imports of torch, the store's bf16 decode."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch


def test_store_summary_and_cli_do_not_import_torch():
    code = "import sys, pipeline.cli, pipeline.store.info, pipeline.store.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_decode_bf16_equals_torch_conversion_bit_for_bit():
    from pipeline.store.reader import decode_bf16

    x = torch.randn(3, 50, 7) * 1e4
    x[0, 0, :5] = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e-40])
    raw = x.bfloat16().view(torch.int16).numpy()
    want = torch.from_numpy(raw).view(torch.bfloat16).float().numpy()
    got = decode_bf16(raw)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.array_equal(decode_bf16(raw[:, ::2]).view(np.uint32), want[:, ::2].view(np.uint32))  # strided
