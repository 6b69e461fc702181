"""pipeline.metrics against torch.distributions and hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from pipeline import metrics as M
from pipeline.errors import LenspipeError
from pipeline.metrics import aggregate, fused

SEEDS = (0, 1, 2)


def _logits(seed: int, n: int = 7, vocab: int = 11, dtype=torch.float64, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g, dtype=dtype) * scale


# --------------------------------------------------------------------------- per token


@pytest.mark.parametrize("seed", SEEDS)
def test_log_probs_matches_categorical(seed):
    logits = _logits(seed)
    torch.testing.assert_close(M.log_probs(logits), Categorical(logits=logits).logits)
    assert M.log_probs(logits).dtype == torch.float64
    assert M.log_probs(logits.half()).dtype == torch.float32  # float32 at least
    assert M.log_probs(logits.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_matches_distributions_and_is_nonnegative(seed):
    final, lens = _logits(seed), _logits(seed + 100)
    p, q = M.log_probs(final), M.log_probs(lens)
    kl = M.kl_div(p, q)
    assert kl.shape == (7,)
    expected = kl_divergence(Categorical(logits=final), Categorical(logits=lens))
    torch.testing.assert_close(kl, expected)
    assert (kl >= 0).all()
    assert (M.kl_div(p, p) == 0).all()
    # float32 inputs stay float32 and still agree closely
    kl32 = M.kl_div(p.float(), q.float())
    assert kl32.dtype == torch.float32
    torch.testing.assert_close(kl32.double(), kl, rtol=1e-4, atol=1e-5)


def test_kl_and_entropy_handle_zero_probabilities():
    # A token impossible under both distributions contributes 0 (0 log 0), not nan.
    logits = torch.tensor([[0.0, 1.0, -math.inf], [2.0, -math.inf, 0.5]], dtype=torch.float64)
    lp = M.log_probs(logits)
    assert torch.isfinite(M.kl_div(lp, lp)).all() and (M.kl_div(lp, lp) == 0).all()
    torch.testing.assert_close(M.entropy(lp), Categorical(logits=logits).entropy())
    # Row 0: final puts mass on token 1 where the lens has none, so KL is infinite.
    # Row 1: both are zero on token 1, so KL is finite and matches torch.distributions.
    lens_logits = torch.tensor([[0.0, -math.inf, 1.0]] * 2, dtype=torch.float64)
    kl = M.kl_div(lp, M.log_probs(lens_logits))
    assert torch.isinf(kl[0]) and torch.isfinite(kl[1])
    torch.testing.assert_close(kl[1], kl_divergence(Categorical(logits=logits[1]), Categorical(logits=lens_logits[1])))


@pytest.mark.parametrize("seed", SEEDS)
def test_cross_entropy_and_entropy_match_categorical(seed):
    logits = _logits(seed)
    ids = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(seed))
    lp = M.log_probs(logits)
    dist = Categorical(logits=logits)
    torch.testing.assert_close(M.cross_entropy(lp, ids), -dist.log_prob(ids))
    torch.testing.assert_close(M.entropy(lp), dist.entropy())
    assert M.cross_entropy(lp.float(), ids).dtype == torch.float32


@pytest.mark.parametrize("seed", SEEDS)
def test_top1_rank_and_topk(seed):
    lens, final = M.log_probs(_logits(seed)), M.log_probs(_logits(seed + 50))
    ids, prob = M.top1(lens)
    assert torch.equal(ids, lens.argmax(-1))
    torch.testing.assert_close(prob, lens.exp().max(-1).values)
    assert (M.rank_of(lens, ids) == 0).all()
    # rank equals the position in a descending sort (no ties in random floats)
    order = lens.argsort(-1, descending=True)
    tgt = torch.randint(0, 11, (7,), generator=torch.Generator().manual_seed(seed))
    expected = (order == tgt[:, None]).int().argmax(-1)
    assert torch.equal(M.rank_of(lens, tgt), expected)
    # k = vocab: always agreed; k = 1: argmax equality; agreement grows with k
    assert M.topk_agreement(lens, final, 11).all()
    assert torch.equal(M.topk_agreement(lens, final, 1), lens.argmax(-1) == final.argmax(-1))
    prev = torch.zeros(7, dtype=torch.bool)
    for k in range(1, 12):
        agree = M.topk_agreement(lens, final, k)
        top = lens.topk(k, dim=-1).indices
        assert torch.equal(agree, (top == final.argmax(-1)[:, None]).any(-1))
        assert (agree >= prev).all()
        prev = agree
    with pytest.raises(ValueError):
        M.topk_agreement(lens, final, 0)


def test_rank_ties_follow_argmax():
    # rows with ties next to a row without: ties are broken by id only where they occur
    lp = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.1, 0.4], [0.1, 0.2, 0.3, 0.4]]))
    assert M.rank_of(lp, torch.tensor([0, 1, 3])).tolist() == [0, 0, 0]
    assert M.rank_of(lp, torch.tensor([3, 3, 0])).tolist() == [3, 1, 3]
    assert M.rank_of(lp, torch.tensor([2, 2, 2])).tolist() == [2, 3, 1]
    assert torch.equal(M.top1(lp)[0], torch.tensor([0, 1, 3]))
    final = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3))  # final top-1 is token 3
    assert M.topk_agreement(lp, final, 1).tolist() == [False, False, True]
    assert M.topk_agreement(lp, final, 2).tolist() == [False, True, True]


@pytest.mark.parametrize("seed", SEEDS)
def test_topk_agreement_equals_rank_with_many_ties(seed):
    # integer logits: ties everywhere, including at the k-th place
    g = torch.Generator().manual_seed(seed)
    lens = M.log_probs(torch.randint(0, 3, (64, 9), generator=g).double())
    final = M.log_probs(torch.randn(64, 9, generator=g, dtype=torch.float64))
    for k in range(1, 10):
        expected = M.rank_of(lens, final.argmax(-1)) < k
        assert torch.equal(M.topk_agreement(lens, final, k), expected)
    assert torch.equal(M.topk_agreement(lens, final, 1), lens.argmax(-1) == final.argmax(-1))


def test_next_token_targets():
    ids = torch.tensor([10, 11, 12, 20, 21, 22])
    nxt, mask = M.next_token_targets(ids, 3)
    assert mask.tolist() == [True, True, False, True, True, False]
    assert nxt[mask].tolist() == [11, 12, 21, 22]
    assert nxt.dtype == torch.int64 and (nxt >= 0).all()
    nxt, mask = M.next_token_targets(ids, 1)  # length-1 sequences: no targets at all
    assert not mask.any()
    with pytest.raises(LenspipeError):
        M.next_token_targets(ids, 4)


def test_adjacent_agreement():
    top = torch.tensor([[1, 2, 3], [1, 5, 3], [1, 5, 4]])
    assert M.adjacent_agreement(top).tolist() == [[True, False, True], [True, True, False]]
    assert M.adjacent_agreement(top[:1]).shape == (0, 3)


# --------------------------------------------------------------------------- aggregation


def test_calibration_perfect_and_hand_ece():
    cal = M.CalibrationBins(4).update(torch.full((4,), 0.75), torch.tensor([1, 1, 1, 0]).bool())
    assert cal.ece() == pytest.approx(0.0)
    t = cal.table()
    assert t["count"] == [0, 0, 0, 4] and t["bin_lower"] == [0, 0.25, 0.5, 0.75]
    assert t["bin_upper"] == [0.25, 0.5, 0.75, 1.0]
    assert t["mean_confidence"][3] == pytest.approx(0.75) and t["accuracy"][3] == 0.75
    assert t["accuracy"][0] is None

    # bin [0.8, 0.9): conf 0.85 x2, 1 correct -> |0.5 - 0.85| ; bin [0.2, 0.3): conf 0.2, correct
    # -> |1 - 0.2|; conf 1.0 goes into the last bin, correct -> 0. ECE = (2*.35 + .8 + 0) / 4
    cal = M.CalibrationBins(10)
    conf = torch.tensor([0.85, 0.85, 0.2, 1.0, 0.5])
    correct = torch.tensor([True, False, True, True, False])
    cal.update(conf, correct, mask=torch.tensor([True, True, True, True, False]))
    assert cal.total == 4 and cal.table()["count"][9] == 1 and cal.table()["count"][5] == 0
    assert cal.ece() == pytest.approx((2 * 0.35 + 0.8) / 4)
    assert math.isnan(M.CalibrationBins().ece())


def test_calibration_merge_equals_single_accumulation():
    g = torch.Generator().manual_seed(3)
    conf, correct = torch.rand(200, generator=g), torch.rand(200, generator=g) < 0.6
    mask = torch.rand(200, generator=g) < 0.9
    whole = M.CalibrationBins(7).update(conf, correct, mask)
    a = M.CalibrationBins(7).update(conf[:80], correct[:80], mask[:80])
    b = M.CalibrationBins(7).update(conf[80:], correct[80:], mask[80:])
    a.merge(b)
    assert a.table()["count"] == whole.table()["count"]
    torch.testing.assert_close(a.conf_sum, whole.conf_sum)
    assert a.ece() == pytest.approx(whole.ece())
    with pytest.raises(ValueError):
        a.merge(M.CalibrationBins(8))


def test_per_sequence_sums():
    values = torch.tensor([1.0, 2.0, math.inf, 4.0, 5.0, 6.0])
    mask = torch.tensor([True, True, False, True, False, True])
    sums, counts = M.per_sequence_sums(values, mask, 3)
    assert sums.tolist() == [3.0, 10.0] and counts.tolist() == [2, 2]
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64
    sums, counts = M.per_sequence_sums(values[3:], None, 1)
    assert sums.tolist() == [4.0, 5.0, 6.0] and counts.tolist() == [1, 1, 1]
    with pytest.raises(LenspipeError):
        M.per_sequence_sums(values, mask, 4)


def _seq_data(n_seq: int, seed: int = 0, seq_len: int = 16):
    g = torch.Generator().manual_seed(seed)
    # correlated within a sequence: a per-sequence offset plus token noise
    offset = torch.randn(n_seq, 1, generator=g)
    vals = (offset + 0.3 * torch.randn(n_seq, seq_len, generator=g)).flatten()
    mask = torch.rand(n_seq * seq_len, generator=g) < 0.9
    return M.per_sequence_sums(vals, mask, seq_len)


def _naive_bootstrap(sums, counts, n_boot, level, seed):
    gen = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(n_boot):
        idx = torch.randint(0, len(sums), (len(sums),), generator=gen).tolist()
        stats.append(sum(sums[i].item() for i in idx) / sum(counts[i].item() for i in idx))
    alpha = (1 - level) / 2
    return tuple(np.percentile(stats, [100 * alpha, 100 * (1 - alpha)]))


def test_bootstrap_matches_naive_loop_and_is_deterministic(monkeypatch):
    sums, counts = _seq_data(9)
    lo, hi = M.bootstrap_ci(sums, counts, n_boot=50, level=0.9, seed=4)
    nlo, nhi = _naive_bootstrap(sums, counts, 50, 0.9, 4)
    assert lo == pytest.approx(nlo, rel=1e-12) and hi == pytest.approx(nhi, rel=1e-12)
    assert M.bootstrap_ci(sums, counts, n_boot=50, level=0.9, seed=4) == (lo, hi)
    assert M.bootstrap_ci(sums, counts, n_boot=50, level=0.9, seed=5) != (lo, hi)
    # The memory block size does not change the draws.
    monkeypatch.setattr(aggregate, "BOOT_BLOCK_ELEMENTS", 20)
    assert M.bootstrap_ci(sums, counts, n_boot=50, level=0.9, seed=4) == (lo, hi)


def test_bootstrap_contains_estimate_and_shrinks():
    widths = []
    for n_seq in (20, 500):
        sums, counts = _seq_data(n_seq, seed=1)
        point = float(sums.sum() / counts.sum())
        lo, hi = M.bootstrap_ci(sums, counts, n_boot=400)
        assert lo < point < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n_seq): 5x narrower expected


def test_bootstrap_errors_and_empty_sequences():
    with pytest.raises(LenspipeError):
        M.bootstrap_ci(torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(LenspipeError):
        M.bootstrap_ci(torch.zeros(3), torch.zeros(3, dtype=torch.int64))
    # one sequence with tokens among empty ones: replicates of only empty ones are dropped
    lo, hi = M.bootstrap_ci(torch.tensor([0.0, 6.0, 0.0]), torch.tensor([0, 3, 0]), n_boot=100)
    assert lo == hi == pytest.approx(2.0)


def test_bits_per_byte():
    assert M.bits_per_byte(100 * math.log(2), 50) == pytest.approx(2.0)
    assert M.bits_per_byte(torch.tensor(8.0), 4) == pytest.approx(2.0 / math.log(2))
    with pytest.raises(LenspipeError):
        M.bits_per_byte(1.0, 0)


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_logit_stats_equal_reference_functions(seed):
    from pipeline.metrics import final_stats, logit_stats

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(12, 50, generator=g, dtype=torch.float64) * 3
    zf = torch.randn(12, 50, generator=g, dtype=torch.float64) * 3
    nxt = torch.randint(0, 50, (12,), generator=g)
    final = final_stats(zf)
    got = logit_stats(z, final, nxt, k=5, with_rank=True)
    lp, fp = M.log_probs(z), M.log_probs(zf)
    torch.testing.assert_close(got["kl"], M.kl_div(fp, lp))
    torch.testing.assert_close(got["entropy"], M.entropy(lp))
    torch.testing.assert_close(got["ce"], M.cross_entropy(lp, nxt))
    ids, prob = M.top1(lp)
    assert torch.equal(got["top1"], ids)
    torch.testing.assert_close(got["top1_prob"], prob)
    assert torch.equal(got["agree_topk"], M.topk_agreement(lp, fp, 5))
    assert torch.equal(got["agree_top1"], M.topk_agreement(lp, fp, 1))
    assert torch.equal(got["rank"], M.rank_of(lp, nxt))


def _peaked_logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    """(n, vocab) float32 logits shaped like a real LM's: a large offset (lse ~ 25) and a
    few favoured tokens, where float32 shortcuts lose digits."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * 3 + 10
    z[:, :5] += 11
    return z


def test_fused_stats_exact_in_float32_on_a_real_vocabulary():
    # The model's float32 softmax over 49k tokens sums to 1 + ~1e-5; treating it as 1
    # put KL ~3e-4 nats too low. Compare with float64 on the very same float32 logits.
    from pipeline.metrics import final_stats, logit_stats

    vocab = 49152
    z, zf = _peaked_logits(32, vocab, 0), _peaked_logits(32, vocab, 1)
    nxt = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(2))
    got = logit_stats(z, final_stats(zf), nxt, k=5)
    lp, fp = M.log_probs(z.double()), M.log_probs(zf.double())
    assert (got["kl"].double() - M.kl_div(fp, lp)).abs().max() < 3e-5
    assert (got["entropy"].double() - M.entropy(lp)).abs().max() < 3e-5
    assert (got["ce"].double() - M.cross_entropy(lp, nxt)).abs().max() < 3e-5
    torch.testing.assert_close(got["top1_prob"].double(), M.top1(lp)[1], rtol=1e-6, atol=0)


def test_kl_rows_do_not_depend_on_the_thread_count():
    from pipeline.metrics import kl_rows, target_stats

    z, zf = _peaked_logits(256, 49152, 3), _peaked_logits(256, 49152, 4)
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(kl_rows(z, torch.logsumexp(z, -1), target_stats(M.log_probs(zf))))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("k", [1, 2, 5])
def test_logit_stats_top1_is_argmax_on_ties(k):
    """Top-1 comes from the topk pass: with tied maxima it must still be argmax's (lowest id),
    whether the ties fit in the k values topk returns or not."""
    from pipeline.metrics import final_stats, logit_stats

    z = torch.zeros(4, 40)
    z[0, [3, 17, 30]] = 5.0  # three tied maxima
    z[1] = 1.0  # every entry tied
    z[2, [39, 38]] = 2.0  # two at the end
    z[3, 9] = 3.0  # unique
    final = final_stats(torch.randn(4, 40, generator=torch.Generator().manual_seed(0)))
    got = logit_stats(z, final, torch.zeros(4, dtype=torch.long), k=k, with_rank=True)
    assert torch.equal(got["top1"], z.argmax(-1)), got["top1"]
    assert torch.equal(got["rank"], M.rank_of(z, torch.zeros(4, dtype=torch.long)))


def test_logit_stats_with_a_reused_workspace_equal_fresh_buffers():
    from pipeline.metrics import Workspace, final_stats, logit_stats

    g = torch.Generator().manual_seed(5)
    z, zf = torch.randn(6, 300, generator=g) * 4, torch.randn(6, 300, generator=g) * 4
    nxt = torch.randint(0, 300, (6,), generator=g)
    ws, final = Workspace(), final_stats(zf)
    logit_stats(z * 2, final, nxt, k=5, with_rank=True, ws=ws)  # fills the buffers with other values
    again = logit_stats(z, final, nxt, k=5, with_rank=True, ws=ws)
    fresh = logit_stats(z, final, nxt, k=5, with_rank=True, ws=Workspace())
    assert again.keys() == fresh.keys() and all(torch.equal(again[key], fresh[key]) for key in fresh)


def test_logit_stats_on_a_row_with_nan_gives_nan_metrics_not_an_error():
    """A diverged lens (NaN logits) must give NaN metrics, as before, not an index error."""
    from pipeline.metrics import final_stats, logit_stats

    z = torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
    z[1, 4] = float("nan")
    final = final_stats(torch.randn(3, 20, generator=torch.Generator().manual_seed(1)))
    got = logit_stats(z, final, torch.zeros(3, dtype=torch.long), k=5, with_rank=True)
    assert torch.equal(got["top1"], z.argmax(-1)) and got["kl"][1].isnan() and not got["kl"][[0, 2]].isnan().any()


def test_row_blocks_give_the_bits_of_one_pass_over_all_rows(monkeypatch):
    """logit_stats, final_stats and kl_and_lse run in cache-sized row blocks on the CPU; the
    results must be bitwise those of one pass over all rows, also where the rows do not
    divide into blocks (a lone last row would be reduced across threads: other bits)."""
    from pipeline.metrics import final_stats, kl_and_lse, logit_stats, row_blocks

    vocab, n = 49152, 7  # rows long enough for torch to split a lone row across threads
    z, zf = _peaked_logits(n, vocab, 5), _peaked_logits(n, vocab, 6)
    nxt = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(7))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = []
        for block_rows in (3, n):  # 4 + 3 rows (the lone last row joins the first block), then all
            monkeypatch.setattr(fused, "CACHE_BLOCK_BYTES", block_rows * vocab * 4)
            runs.append((row_blocks(z), final_stats(zf)))
            final = runs[-1][1]
            runs[-1] += (
                logit_stats(z, final, nxt, k=5, with_rank=True, ws=M.Workspace()),
                dict(zip(("kl", "lse"), kl_and_lse(z, final))),
            )
    finally:
        torch.set_num_threads(before)
    (blocks, *blocked), (whole, *one_pass) = runs
    assert [b.stop - b.start for b in blocks] == [4, 3] and len(whole) == 1
    for got, want in zip(blocked, one_pass):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("vocab", [40, 256, 1000, 1024])
def test_argmax_rows_is_torch_argmax_with_its_tie_rule(vocab):
    from pipeline.metrics.fused import _argmax_rows

    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(8, vocab, generator=g)
    z[0, [vocab - 1, 3]] = 9.0  # tied maxima in the first and last segment
    z[1, [vocab // 2, vocab - 2]] = 9.0  # in two later segments
    z[2] = -float("inf")  # nothing but -inf
    z[3, vocab - 1] = float("inf")  # the very last entry
    z[4, [5, vocab - 3]] = float("nan")  # NaN: argmax's own answer
    z[5] = 1.0  # every entry tied
    top, zmax = _argmax_rows(z)
    assert torch.equal(top, z.argmax(-1)), (top, z.argmax(-1))
    assert torch.equal(zmax, z.amax(-1)) or torch.equal(zmax.isnan(), z.amax(-1).isnan())
