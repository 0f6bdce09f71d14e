"""A channel order (minisparse/channel_order.py, reorder.py, --channel_order) leaves the model as it is.

- In float64 a reordered model's logits equal the stored order's to ~1e-13 on every kind of model
  (ReLU² and SwiGLU, GQA, tied and untied, RoPE's pairs layout, 1.58 bits with INT8 inputs, top-K and
  a per-site plan), and top-K keeps the same channels at their new positions.
- Zeros tied at the K-th place (ReLU²'s, when fewer than K inputs are nonzero) change nothing.
- The programs: generate.py --channel_order prints the stored order's --reference text on every path
  (the default, each --kernel, a batch, a plan, --fallback auto), with logits within 1e-10, on a tiny
  trained run and on SmolLM2 with an order reorder.py chose; in float32 the reordered SmolLM2 flips
  only at near-ties (the rule of tests/test_float32_near_ties.py).
- export.py --channel_order writes the reordered model, which transformers loads and runs as
  minisparse does, and GGUF reads back as the reordered weights.
- The order's choice lengthens runs where channels are kept together, and a bad file, N:M, or a
  dense model without --sparsity are one sentence each.
"""

import importlib.util
import os
from dataclasses import replace

import numpy as np
import pytest

import export as export_program
import generate
import reorder
from minisparse import channel_order as co
from minisparse import model, pretrained
from minisparse.config import GPTConfig
from minisparse.errors import UsageError
from minisparse.linear import SparseSpec
from test_float64_programs import (KERNELS, REAL_LOAD, check_fallback, load_gguf_once, needs_weights,  # noqa: F401
                                   run, same, texts)
from test_programs import call

TOL = 1e-12


def random_order(cfg, seed):
    rng = np.random.default_rng(seed)
    return {k: np.stack([rng.permutation(s[-1]) for _ in range(int(np.prod(s[:-1])))]).reshape(s)
            for k, s in co.shapes(cfg).items()}


def noisy(cfg, seed=1):
    p = model.init_params(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    return {k: v + rng.normal(0, 0.1, v.shape) for k, v in p.items()}


KINDS = {
    "relu2_gqa_untied": dict(activation="relu2", n_kv_head=2),
    "swiglu_mqa_tied_pairs": dict(activation="swiglu", n_kv_head=1, tie_embeddings=True, rope_layout="pairs"),
    "relu2_1.58bit": dict(activation="relu2", w_bits=1.58, a_bits=8),
    "swiglu_mha": dict(activation="swiglu"),
}


def tiny_cfg(**kw):
    return GPTConfig(**{**dict(vocab_size=40, block_size=16, n_layer=2, n_head=4, n_embd=32, n_hidden=48,
                               sparsity=0.5), **kw})


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.8])
def test_a_new_order_is_the_same_model_in_float64(kind, sparsity):
    cfg = tiny_cfg(**KINDS[kind], sparsity=sparsity)
    p = noisy(cfg)
    order = random_order(cfg, 2)
    q = co.apply(p, cfg, order)
    assert any(not np.array_equal(p[k], q[k]) for k in p)                # the weights did move
    assert all(q[k].flags.c_contiguous for k in q)      # a[:, r] comes back column-major: a strided head
    idx = np.random.default_rng(3).integers(0, cfg.vocab_size, (3, 16))
    a, b = model.forward(p, cfg, idx)[0], model.forward(q, cfg, idx)[0]
    err = np.abs(a - b).max() / np.abs(a).max()
    assert err < TOL, f"{kind} at {sparsity}: the reordered logits are {err:.1e} from the stored order's"
    back = co.apply(q, cfg, co.inverse(order))
    assert all(np.array_equal(back[k], p[k]) for k in p)                 # the inverse undoes it exactly
    if sparsity:                                                          # the same channels, moved
        kp = co.selections(p, cfg, idx, cfg.spec)
        kq = co.selections(q, cfg, idx, cfg.spec)
        for l in range(cfg.n_layer):
            for site, o in co.site_orders(order, cfg, l).items():
                if site == "down" and cfg.activation == "relu2":
                    continue                  # ReLU²'s zeros tie at the K-th place: the test below
                assert np.array_equal(kq[l, site], kp[l, site][:, o]), (l, site)


def test_a_per_site_plan_is_the_same_model_in_float64():
    from minisparse.evaluate import Plan, plan_forward
    cfg = tiny_cfg(activation="swiglu", n_kv_head=2)
    p = noisy(cfg, 4)
    q = co.apply(p, cfg, random_order(cfg, 5))
    plan = Plan({(l, s): cfg.spec_at([0.3, 0.5, 0.0, 0.7][(l + i) % 4]) for l in range(2)
                 for i, s in enumerate(model.SITES)}, "plan")
    idx = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, 16))
    a, b = plan_forward(p, cfg, idx, plan, model.REFERENCE), plan_forward(q, cfg, idx, plan, model.REFERENCE)
    assert np.abs(a - b).max() / np.abs(a).max() < TOL


def test_zeros_tied_at_the_kth_place_change_nothing():
    """ReLU² at 10%: K = 43 of 48 hidden units, but about half are zero, so zeros tie at the K-th
    place and which of them are kept depends on the order; a kept zero adds nothing."""
    cfg = tiny_cfg(activation="relu2", sparsity=0.1)
    p = noisy(cfg, 7)
    idx = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 16))
    kept = co.selections(p, cfg, idx, cfg.spec)
    assert any(kept[l, "down"].sum(axis=1).min() == 43 for l in range(2))
    order = random_order(cfg, 9)
    q = co.apply(p, cfg, order)
    kq = co.selections(q, cfg, idx, cfg.spec)
    moved = [not np.array_equal(kq[l, "down"], kept[l, "down"][:, order["ffn"][l]]) for l in range(2)]
    assert any(moved), "no tied zero was kept differently: the test has no teeth"
    a, b = model.forward(p, cfg, idx)[0], model.forward(q, cfg, idx)[0]
    assert np.abs(a - b).max() / np.abs(a).max() < TOL


def test_runs_counts_stretches_of_kept_channels():
    m = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=bool)
    assert co.runs(m) == (2 + 0 + 2) / 3


def test_the_chosen_order_puts_channels_kept_together_next_to_each_other():
    """64 channels in 8 hidden groups of 8, scattered; each token keeps 4 whole groups. As stored a
    token starts about 25 runs; in the chosen order each group is one stretch: at most 4 runs."""
    rng = np.random.default_rng(0)
    where = rng.permutation(64).reshape(8, 8)                            # where group g's channels are
    m = np.zeros((400, 64), dtype=bool)
    for t in range(400):
        m[t, where[rng.choice(8, 4, replace=False)].ravel()] = True
    held = m[200:]
    o = co.path(co.start_cost([m[:200]]), m[:200].mean(axis=0))
    assert sorted(o) == list(range(64))
    assert co.runs(held) > 15 and co.runs(held[:, o]) <= 4.5, (co.runs(held), co.runs(held[:, o]))


def test_nm_is_refused():
    cfg = tiny_cfg(sparsity=0.0, nm=(2, 4))
    with pytest.raises(UsageError, match="N:M"):
        co.apply(noisy(cfg), cfg, co.identity(cfg))


def test_bad_order_files_are_one_sentence(tmp_path):
    cfg = tiny_cfg()
    with pytest.raises(UsageError, match="no such file"):
        co.load(str(tmp_path / "none.npz"), cfg)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(UsageError, match="corrupt"):
        co.load(str(tmp_path / "junk.npz"), cfg)
    co.save(str(tmp_path / "other.npz"), co.identity(tiny_cfg(n_hidden=64)), tiny_cfg(n_hidden=64), {})
    with pytest.raises(UsageError, match="another model"):
        co.load(str(tmp_path / "other.npz"), cfg)
    bad = co.identity(cfg)
    bad["ffn"][1, 3] = 0                                                  # 0 twice, 3 missing
    co.save(str(tmp_path / "bad.npz"), bad, cfg, {})
    with pytest.raises(UsageError, match="not a permutation"):
        co.load(str(tmp_path / "bad.npz"), cfg)
    co.save(str(tmp_path / "good.npz"), co.identity(cfg), cfg, {"sparsity": 0.5})
    order, meta = co.load(str(tmp_path / "good.npz"), cfg)
    assert meta["sparsity"] == 0.5 and np.array_equal(order["resid"], np.arange(32))
    assert not os.path.exists(str(tmp_path / "good.npz") + ".tmp")


# --- the programs -------------------------------------------------------------------------------

def one_sentence(rc, err, program, *needles):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith(program + ": "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def tiny_order(run, tmp_path_factory):
    path = tmp_path_factory.mktemp("order") / "order.npz"
    assert reorder.main(["--out_dir", str(run), "--to", str(path), "--windows", "2", "--block", "48"]) == 0
    return path


def check_programs(capsys, source, prompt, sparsity, order, n_layer, tmp_path, n):
    ref = texts(capsys, source, prompt, "--reference", *sparsity, n=n)
    for extra in [["--reference"], []] + [["--kernel", k] for k in KERNELS]:
        same(texts(capsys, source, prompt, "--channel_order", order, *extra, *sparsity, n=n), ref,
             f"--channel_order {extra}")
    got = texts(capsys, source, prompt, "--channel_order", order, "--num_samples", 3, *sparsity, n=n)
    same((ref[0], None, got[2]), ref, "--channel_order --num_samples 3")
    plan = {f"{l}.{s}": [0.3, 0.5, 0.0][(l + i) % 3] for l in range(n_layer) for i, s in enumerate(model.SITES)}
    path = tmp_path / "plan.json"
    path.write_text(__import__("json").dumps({"allocation": {"sparsity": plan}}))
    same(texts(capsys, source, prompt, "--channel_order", order, "--sparsity_plan", path, n=n),
         texts(capsys, source, prompt, "--reference", "--sparsity_plan", path, n=n), "--channel_order --sparsity_plan")
    return ref


def test_tiny_run_reordered_prints_the_reference_text(run, tiny_order, capsys, tmp_path, monkeypatch):
    check_programs(capsys, ["--out_dir", run], "the cat sat on", [], tiny_order, 2, tmp_path, 16)
    # --fallback auto, both branches, with the order (check_fallback's texts get it through the parser)
    real = generate.build_parser

    def with_order():
        p = real()
        p.set_defaults(channel_order=str(tiny_order))
        return p
    monkeypatch.setattr(generate, "build_parser", with_order)
    check_fallback(capsys, ["--out_dir", run], "the cat sat on", [], "S=0.5", tmp_path)


def test_program_errors_are_one_sentence(run, tiny_order, capsys, tmp_path):
    rc, _, err = call(generate, ["--out_dir", run, "--channel_order", tmp_path / "none.npz", "--max_new_tokens", 2],
                      capsys)
    one_sentence(rc, err, "generate.py", "no such file")
    rc, _, err = call(reorder, ["--out_dir", run], capsys)
    one_sentence(rc, err, "reorder.py", "--to")
    rc, _, err = call(reorder, ["--out_dir", run, "--to", tiny_order], capsys)
    one_sentence(rc, err, "reorder.py", "exists", "--force")
    rc, _, err = call(reorder, ["--out_dir", run, "--to", tmp_path / "o.npz", "--sparsity", "0"], capsys)
    one_sentence(rc, err, "reorder.py", "dense")
    rc, _, err = call(reorder, ["--out_dir", run, "--to", tmp_path / "o.npz", "--sparsity", "1.5"], capsys)
    one_sentence(rc, err, "reorder.py", "1.5")
    rc, _, err = call(reorder, ["--out_dir", run, "--to", tmp_path / "o.npz", "--windows", "500"], capsys)
    one_sentence(rc, err, "reorder.py", "tokens")
    assert not (tmp_path / "o.npz").exists()


def test_nm_model_with_an_order_is_one_sentence(tmp_path, tmp_path_factory, capsys):
    import train_tiny
    from conftest import write_corpus
    from test_programs import tiny
    corpus = write_corpus(tmp_path_factory, "the cat sat on a mat", 50)
    out = tmp_path / "nm"
    assert train_tiny.main(tiny(corpus, out, "--nm", "2:4", "--sparsity", "0", "--max_iters", 2)) == 0
    _, _, cfg, _, _ = __import__("minisparse.run", fromlist=["load_run"]).load_run(str(out))
    co.save(str(tmp_path / "o.npz"), co.identity(cfg), cfg, {})
    rc, _, err = call(generate, ["--out_dir", out, "--channel_order", tmp_path / "o.npz", "--max_new_tokens", 2],
                      capsys)
    one_sentence(rc, err, "generate.py", "N:M")
    rc, _, _ = call(generate, ["--out_dir", out, "--channel_order", tmp_path / "o.npz", "--max_new_tokens", 2,
                               "--sparsity", "0.5"], capsys)
    assert rc == 0                                                        # --sparsity makes it top-K


@pytest.fixture(scope="module")
def smol_order(tmp_path_factory):
    path = tmp_path_factory.mktemp("smol-order") / "order.npz"
    real = reorder.pretrained.load_gguf
    reorder.pretrained.load_gguf = load_gguf_once
    try:
        assert reorder.main(["--init_from", "smollm2", "--sparsity", "0.4", "--to", str(path),
                             "--windows", "2", "--block", "32"]) == 0
    finally:
        reorder.pretrained.load_gguf = real
    return path


@needs_weights
def test_smollm2_reordered_prints_the_reference_text(smol_order, capsys, tmp_path):
    order, _ = co.load(str(smol_order), pretrained.load_gguf("smollm2", block_size=8)[1])
    assert not np.array_equal(order["resid"], np.arange(len(order["resid"])))
    check_programs(capsys, ["--init_from", "smollm2", "--raw"], "The capital of France is", ["--sparsity", "0.4"],
                   smol_order, 30, tmp_path, 8)


@needs_weights
def test_smollm2_reordered_float32_flips_only_at_near_ties(smol_order, monkeypatch):
    from minisparse.fast import FAST
    from test_float32_near_ties import SMOL_PATHS, check_paths
    p64, cfg, tok, _ = pretrained.load_gguf("smollm2", block_size=32, dtype=np.float64)
    cfg = replace(cfg, sparsity=0.4)
    order, _ = co.load(str(smol_order), cfg)
    q64 = co.apply(p64, cfg, order)
    q32 = co.apply({k: v.astype(np.float32) for k, v in p64.items()}, cfg, order)
    ids = tok.encode("The capital of France is Paris, and")
    check_paths(monkeypatch, q64, cfg, SparseSpec(0.4), ids[:5], SMOL_PATHS, p32=q32)
    check_paths(monkeypatch, q64, cfg, SparseSpec(0.4), ids[:9], [("auto", FAST)], B=3, p32=q32)


# --- export -------------------------------------------------------------------------------------

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("torch")


def test_export_hf_writes_the_reordered_model(run, tiny_order, capsys, tmp_path):
    if not HAVE_TRANSFORMERS:
        pytest.skip("transformers is not installed (test_export.py requires it in CI)")
    import torch
    import transformers
    from minisparse.run import load_run
    params, _, cfg, tok, _ = load_run(str(run), np.float64)
    order, _ = co.load(str(tiny_order), cfg)
    to = tmp_path / "hf"
    rc, _, err = call(export_program, ["--out_dir", run, "--to", to, "--channel_order", tiny_order], capsys)
    assert rc == 0, err
    hf = transformers.LlamaForCausalLM.from_pretrained(str(to), dtype=torch.float64, attn_implementation="eager").eval()
    wte = hf.model.embed_tokens.weight.detach().numpy()
    assert np.array_equal(wte, params["wte"][:, order["resid"]]) and not np.array_equal(wte, params["wte"])
    idx = np.array([tok.encode("the cat sat on a mat")])
    with torch.no_grad():
        got = hf(torch.tensor(idx)).logits.double().numpy()
    dense = model.forward(params, replace(cfg, sparsity=0.0), idx)[0]
    assert np.abs(got - dense).max() / np.abs(dense).max() < 2e-6        # the same dense model as stored


@needs_weights
def test_export_gguf_writes_the_order_the_user_chooses(smol_order, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(export_program.pretrained, "load_gguf", load_gguf_once)
    params, cfg, _, _ = load_gguf_once("smollm2", dtype=np.float32, block_size=1 << 30)
    order, _ = co.load(str(smol_order), cfg)
    for chosen, want in ((None, params), (smol_order, co.apply(params, cfg, order))):
        to = tmp_path / "m.gguf"
        rc, _, err = call(export_program, ["--init_from", "smollm2", "--format", "gguf", "--to", to, "--force"]
                          + (["--channel_order", chosen] if chosen else []), capsys)
        assert rc == 0, err
        back, _, _, _ = REAL_LOAD(str(to))                # the file itself, not load_gguf_once's copy
        assert all(np.array_equal(back[k], want[k]) for k in want), f"--channel_order {chosen}"
        del back
