"""Process-level behaviour: the allocator setting, lazy imports of torch, the bf16 decode."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

FAULTS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from pipeline.allocator import keep_freed_memory
    assert keep_freed_memory()
x = torch.ones(8, 256, 576)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a forward pass's activations: many mid-size temporaries, live together
    hs = [x * 2 for _ in range(8)]            # 4.7 MB each
    big = torch.ones(8, 256, 1536) + x.sum()  # an MLP's hidden: 12.6 MB
    del hs, big
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_refaulting_a_forward_pass_temporaries():
    """20 rounds of forward-pass-sized temporaries: glibc maps and unmaps them each round;
    with the setting the heap keeps them (measured 64k vs 20k faults)."""
    plain, kept = _faults("plain"), _faults("keep")
    assert plain > 30_000
    assert kept < plain / 2, (plain, kept)


def test_store_summary_and_cli_do_not_import_torch():
    code = "import sys, pipeline.cli, pipeline.store.info, pipeline.store.verify; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_decode_bf16_is_the_top_half_of_the_float32_for_every_bit_pattern():
    """Every one of the 65,536 bf16 patterns (NaN payloads, -0, subnormals, inf) widens to
    the float32 with the same bits in its top half, through the reader's decode and dask's,
    contiguous, strided and read-only."""
    from pipeline.store.dtypes import DTYPES
    from pipeline.store.reader import _decode_block, decode_bf16

    raw = np.arange(2**16, dtype=np.uint32).astype(np.uint16).reshape(16, 64, 64)
    want = raw.astype(np.uint32) << 16
    assert decode_bf16(raw).dtype == np.float32
    assert np.array_equal(decode_bf16(raw).view(np.uint32), want)
    assert np.array_equal(decode_bf16(raw[:, ::3, 1:]).view(np.uint32), want[:, ::3, 1:])  # strided
    assert np.array_equal(_decode_block(raw, DTYPES["bfloat16"]).view(np.uint32), want)
    frozen = raw.copy()
    frozen.flags.writeable = False
    assert np.array_equal(decode_bf16(frozen).view(np.uint32), want)
