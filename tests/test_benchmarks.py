"""The decode benchmark's own machinery: the turn-taking timer, the cache size, and one short run."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks import decode_speed, machine  # noqa: E402


def test_interleaved_ms_takes_turns_in_blocks():
    calls = []
    fs = [lambda i, name=name: calls.append((name, i)) for name in "abc"]
    times = decode_speed.interleaved_ms(fs, clock=lambda: 0.0, repeats=6, rounds=2, settle_s=0.0)
    assert times == [0.0, 0.0, 0.0]
    # a warm-up call of each, then per round and function: one untimed call and a block of 3
    want = [("a", 0), ("b", 0), ("c", 0)]
    for r in range(2):
        for name in "abc":
            want += [(name, 3 * r)] + [(name, i) for i in range(3 * r, 3 * r + 3)]
    assert calls == want


def test_last_level_cache_is_a_positive_size():
    assert machine.last_level_cache_mb("cpu") >= 32.0


def test_decode_benchmark_prints_a_row_per_shape(capsys):
    rows = decode_speed.projection_table(decode_speed.np, "gather", [64], [0.0, 0.5], repeats=2,
                                         clock=decode_speed.timer(decode_speed.np), cache_mb=0.5)
    assert [(D, S) for D, S, *_ in rows] == [(64, 0.0), (64, 0.5)]
    assert all(t > 0 for row in rows for t in row[2:5])
    assert rows[0][7] is None and rows[1][7] > 0                  # N:M 16:32 at S = 0.5 only
    out = capsys.readouterr().out
    assert "weights cycled through 1 MB" in out and out.count("x ") >= 2 and "16:32" in out


def test_nm_keep_only_where_the_sparsity_is_a_whole_count_per_block():
    assert [decode_speed.nm_keep(S, 32) for S in (0.0, 0.25, 0.5, 0.75, 0.9)] == [None, 24, 16, 8, None]
    assert decode_speed.nm_keep(0.5, 4) == 2 and decode_speed.nm_keep(0.75, 2) is None


def test_batch_union_counts_the_rows_some_token_of_the_group_kept():
    """B = 1 reads K of D rows; the union grows with B and never passes D; on a random model with
    random tokens it stays near the independent curve 1 - S^B."""
    from benchmarks import batch_union
    from minisparse import model
    from minisparse.linear import SparseSpec
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=64, sparsity=0.5)
    params = model.init_params(cfg, seed=0)
    idx = batch_union.windows(batch_union.np.arange(500) % 13, 64, 8)
    res = batch_union.union_fractions(params, cfg, idx, SparseSpec(0.5))
    for site in ("qkv", "o", "up_gate"):
        u = [res[site][B] for B in batch_union.BATCHES]
        assert u[0] == 0.5 and all(a <= b <= 1.0 for a, b in zip(u, u[1:]))
        assert abs(res[site][2] - 0.75) < 0.08
    nm = batch_union.union_fractions(params, cfg, idx, SparseSpec(0.0, nm=(2, 4)))
    assert nm["qkv"][1] == 0.5 and nm["qkv"][64] <= 1.0


def test_batch_decode_benchmark_prints_a_row_per_batch(capsys):
    from benchmarks import batch_decode
    if batch_decode.fast_rowsparse.numba is None:
        pytest.skip("benchmarks/batch_decode.py needs numba")
    rows = batch_decode.projection_rows(64, [1, 3], 0.5, repeats=2, cache_mb=0.5)
    assert sorted(rows) == [1, 3] and all(v > 0 for r in rows.values() for v in r.values())
    assert "union" in capsys.readouterr().out


def test_whole_run_mode_prepares_nanogpts_data_from_the_same_tokens(tmp_path):
    """train_speed.py --whole: nanoGPT's char files hold minisparse's own train/val ids, every run
    gets the baby configuration's flags, and the final val loss is read from either program's output."""
    import argparse
    import pickle

    import numpy as np
    from benchmarks import train_speed
    from minisparse.data import load_text, split_ids, train_tokenizer
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 20, encoding="utf-8")
    args = argparse.Namespace(whole_iters=30, nanogpt=str(tmp_path / "nanogpt"), data=str(corpus), also=[])
    cmds = train_speed.whole_commands(args, str(tmp_path / "out"))
    assert list(cmds) == ["nanoGPT", "minisparse dense", "minisparse Q-Sparse 50%"]
    folder = tmp_path / "nanogpt" / "data" / "minisparse_corpus_txt"
    tok = train_tokenizer(load_text(str(corpus)), "char")
    train_ids, val_ids = split_ids(tok.encode(load_text(str(corpus))))
    assert np.array_equal(np.fromfile(folder / "train.bin", dtype=np.uint16), train_ids)
    assert np.array_equal(np.fromfile(folder / "val.bin", dtype=np.uint16), val_ids)
    assert pickle.loads((folder / "meta.pkl").read_bytes()) == {"vocab_size": tok.vocab_size}
    nano, _ = cmds["nanoGPT"]
    assert "--compile=False" in nano and "--max_iters=30" in nano and "--dataset=minisparse_corpus_txt" in nano
    dense, cwd = cmds["minisparse dense"]
    assert cwd == train_speed.ROOT and dense[dense.index("--sparsity") + 1] == "0.0"
    assert dense[dense.index("--max_iters") + 1] == "30" and dense[dense.index("--eval_iters") + 1] == "20"
    assert train_speed.final_val_loss("step 0: train loss 4.5, val loss 4.4176\nstep 250: train loss 2.1, "
                                      "val loss 2.0500\n") == 2.05
    assert np.isnan(train_speed.final_val_loss("no evaluation printed"))


def test_step_bandwidth_counts_the_bytes_of_the_rows_each_variant_read():
    """benchmarks/step_bandwidth.py's rates divide by these bytes: dense reads every row, top-K 50%
    exactly K rows of every site, and "no rows" none."""
    from benchmarks import step_bandwidth
    if step_bandwidth.fast_step.numba is None:
        pytest.skip("benchmarks/step_bandwidth.py needs numba")
    import numpy as np
    from minisparse import model
    from minisparse.topk import kept_count
    cfg = model.GPTConfig(vocab_size=31, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                          n_hidden=96, activation="swiglu")
    params = model.init_params(cfg, seed=0)
    fast = step_bandwidth.DecodeWeights(params, cfg)
    times, row_bytes = step_bandwidth.measure(params, cfg, fast, [1, 2, 3], {"S 0": cfg.spec_at(0.0),
                                                                           "S 0.5": cfg.spec_at(0.5)}, 2)
    dims = [model.site_dims(cfg)[s][0] for s in model.SITES]
    assert list(row_bytes) == [4 * w.shape[1] for w in fast.step.wts[0]]
    assert sorted(times) == ["S 0", "S 0.5", "no rows"] and all(len(t) == 2 for t in times.values())
    assert {t[2] for t in times["S 0"]} == {cfg.n_layer * int(np.dot(dims, row_bytes))}
    assert {t[2] for t in times["S 0.5"]} == {cfg.n_layer * sum(kept_count(D, 0.5) * b for D, b in zip(dims, row_bytes))}
    assert {t[2] for t in times["no rows"]} == {0}


def test_topk_flips_records_every_selection_and_finds_none_at_equal_precision():
    """The flip benchmark sees the L x 4 selections of the reference forward; float64 against
    itself flips nothing; the boundary gap is (|x|_(K) - |x|_(K+1)) / |x|_(K), NaN where |x|_(K) = 0."""
    from benchmarks import topk_flips
    from minisparse import model
    cfg = model.GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=32, sparsity=0.5)
    params = {k: v.astype(topk_flips.np.float64) for k, v in model.init_params(cfg, seed=0).items()}
    logits, rec = topk_flips.recorded_forward(params, cfg, [1, 2, 3, 4], 0.5)
    assert logits.shape == (4, 13) and len(rec) == 2 * 4
    assert all(kept.sum(axis=-1).max() <= x.shape[-1] // 2 for x, kept in rec.values())   # K = D / 2
    res = topk_flips.compare(params, params, cfg, [[1, 2, 3, 4]], 0.5)
    assert sum(v[0] for v in res["flips"].values()) == 0 and res["seqs"][0]["first"] is None
    g = topk_flips.boundary_gap(topk_flips.np.array([[4.0, -2.0, 1.0, 0.5], [3.0, 0.0, 0.0, 0.0]]), 2)
    assert g[0] == 0.5 and topk_flips.np.isnan(g[1])


def test_llama_cpp_benchmark_builds_its_commands_and_reads_generates_decode_line(monkeypatch):
    """benchmarks/llama_cpp.py without llama-cpp-python (an optional benchmark-only package): --extra
    appends its arguments to the minisparse command, the decode's tokens and seconds are read from
    generate.py's line, and a missing llama_cpp is one clear error."""
    from benchmarks import llama_cpp as bench
    extra = bench.parse_extra(["50% reordered=--sparsity 0.5 --channel_order 'orders/a b.npz'"])
    assert extra == {"50% reordered": ["--sparsity", "0.5", "--channel_order", "orders/a b.npz"]}
    with pytest.raises(SystemExit):
        bench.parse_extra(["no equals sign"])
    with pytest.raises(SystemExit):
        bench.parse_extra(["minisparse dense=--sparsity 0"])
    cmds = bench.minisparse_variants("Hi.", 16, extra)
    assert list(cmds) == ["minisparse dense", "minisparse 50%", "50% reordered"]
    assert cmds["minisparse 50%"][-2:] == ["--sparsity", "0.5"] and cmds["50% reordered"][-1] == "orders/a b.npz"
    assert cmds["minisparse dense"][:5] == ["generate.py", "--init_from", "smollm2", "--prompt", "Hi."]
    err = ("----------\n16 tokens in 1.90 s: 8 tokens/s (dense)\nof which the prompt: 31 tokens in 0.40 s; "
           "the decode: 16 tokens in 1.50 s, 11 tokens/s\n")
    assert bench.decode_of(err) == (16, 1.5) and bench.decode_of("16 tokens in 1.90 s") is None
    assert bench.answer_of("Hi.\nHello there!\n", "Hi.") == "Hello there!"
    assert bench.answer_of("The capital of France is Paris.\n", "The capital of France is") == " Paris."
    env = bench.environment(3)
    assert env["NUMBA_NUM_THREADS"] == "3" and not any(k in env for k in bench.UNSET)
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install llama-cpp-python"):
        bench.main(["--rounds", "1"])
