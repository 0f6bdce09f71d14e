"""evaluate.py and generate.py --fallback auto: the measurements, the choices, the program.

The measurements are checked against independent computations: the dense loss against the
model's own cross-entropy, KL and agreement against a direct float64 formula, N_a against
model.activated_params, intervals on data whose answer is known. The choices (budget,
allocation, fallback) are checked on inputs built so that the right answer is known.
"""

import json
import math
import os

import numpy as np
import pytest

import evaluate as evaluate_program
import generate
import train_tiny
from minisparse import allocation, evaluate as ev
from minisparse import model
from minisparse.errors import UsageError
from minisparse.run import load_run
from conftest import write_corpus
from test_programs import assert_one_sentence, call, tiny, watch_last_only


def small_cfg(**kw):
    base = dict(vocab_size=13, block_size=12, n_layer=2, n_head=2, n_embd=16, n_hidden=24, sparsity=0.0)
    return model.GPTConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def toy():
    cfg = small_cfg()
    params = model.init_params(cfg, seed=4, dtype=np.float64)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 200)
    x, y = ev.windows(ids, 10)
    return params, cfg, x, y


def test_windows_are_consecutive_tokens_and_their_successors():
    ids = np.arange(35)
    x, y = ev.windows(ids, 10)
    assert x.shape == (3, 10)
    np.testing.assert_array_equal(x[1], np.arange(10, 20))
    np.testing.assert_array_equal(y, x + 1)
    x2, _ = ev.windows(np.arange(1000), 10, max_windows=5)
    assert len(x2) == 5 and x2[0, 0] == 0 and x2[-1, 0] == 980
    with pytest.raises(UsageError, match="fewer than one window"):
        ev.windows(np.arange(5), 10)


def test_dense_score_is_the_models_cross_entropy(toy):
    params, cfg, x, y = toy
    s = ev.score(params, cfg, x, y, [], batch=4)["dense"]
    _, loss, _ = model.forward(params, cfg, x, y)
    assert abs(s.loss.mean() - float(loss)) < 1e-12
    assert np.all(s.kl == 0) and s.agree.all()


def test_uniform_plan_is_the_model_at_that_sparsity(toy):
    params, cfg, x, _ = toy
    for S, nm in ((0.5, None), (0.0, (2, 4))):
        run_cfg = model.GPTConfig(**{**cfg.to_dict(), "sparsity": S, "nm": nm})
        want = model.forward(params, run_cfg, x[:3])[0]
        got = ev.plan_forward(params, cfg, x[:3], ev.uniform(cfg, S, nm), model.REFERENCE)
        np.testing.assert_array_equal(got, want)


def test_kl_and_agreement_against_a_direct_formula(toy):
    params, cfg, x, y = toy
    s = ev.score(params, cfg, x, y, [ev.uniform(cfg, 0.5)], batch=3)["S=0.5"]
    zd = model.forward(params, cfg, x)[0]
    zs = model.forward(params, small_cfg(sparsity=0.5), x)[0]
    pd = np.exp(zd - zd.max(-1, keepdims=True)); pd /= pd.sum(-1, keepdims=True)
    ps = np.exp(zs - zs.max(-1, keepdims=True)); ps /= ps.sum(-1, keepdims=True)
    kl = (pd * np.log(pd / ps)).sum(-1)
    np.testing.assert_allclose(s.kl, kl, rtol=1e-9, atol=1e-13)
    assert s.kl.mean() > 0
    np.testing.assert_array_equal(s.agree, zd.argmax(-1) == zs.argmax(-1))
    want_loss = -np.log(np.take_along_axis(ps, y[..., None], -1)[..., 0])
    np.testing.assert_allclose(s.loss, want_loss, rtol=1e-10)


def test_na_matches_the_models_count(toy):
    params, cfg, x, y = toy
    for S in (0.0, 0.3, 0.5):
        assert ev.nominal_na(cfg, ev.uniform(cfg, S)) == model.activated_params(small_cfg(sparsity=S))
    assert ev.nominal_na(cfg, ev.uniform(cfg, 0.0, (2, 4))) == model.activated_params(small_cfg(nm=(2, 4)))
    s = ev.score(params, cfg, x, y, [ev.uniform(cfg, 0.5)])["S=0.5"]
    per_layer = {l: {site: s.zeros[(l, site)] for site in model.SITES} for l in range(cfg.n_layer)}
    assert ev.measured_na(cfg, s.zeros) == model.activated_params(small_cfg(sparsity=0.5), per_layer)
    # top-K at 50% zeroes exactly half of qkv's 16 inputs, plus the ReLU2's own zeros at down
    assert s.zeros[(0, "qkv")] == 0.5 and s.zeros[(0, "down")] >= 0.5


def test_interval_on_known_data():
    idx = ev.bootstrap_indices(50, n=500, seed=0)
    point, lo, hi = ev.interval(np.full(50, 2.0), np.mean, idx)
    assert point == lo == hi == 2.0                                   # no spread, no interval
    v = np.random.default_rng(0).normal(1.0, 1.0, 50)
    point, lo, hi = ev.interval(v, np.mean, idx)
    se = v.std(ddof=1) / math.sqrt(50)
    assert lo < point < hi and abs((hi - lo) / (2 * 1.96 * se) - 1) < 0.2   # about +-1.96 standard errors
    (d, dlo, dhi), (r, rlo, rhi) = ev.paired_difference(np.ones((50, 4)), np.ones((50, 4)) + 0.1, idx)
    assert abs(d - 0.1) < 1e-12 and abs(dlo - 0.1) < 1e-12 and abs(r - math.expm1(0.1)) < 1e-12


def test_interval_is_95_percent_not_90():
    """The ends are the 2.5 and 97.5 percentiles of the resampled statistic: 2.5% of the draws lie
    below lo and 2.5% above hi (a 90% interval leaves 5% each side), and for the mean of normal data
    the half-width is 1.96 bootstrap standard errors (1.645 at 90%), within 5%."""
    W = 400
    v = np.random.default_rng(3).normal(0.0, 1.0, W)
    idx = ev.bootstrap_indices(W, n=4000, seed=1)
    point, lo, hi = ev.interval(v, np.mean, idx)
    draws = v[idx].mean(axis=1)
    assert np.mean(draws < lo) == pytest.approx(0.025, abs=0.003)
    assert np.mean(draws > hi) == pytest.approx(0.025, abs=0.003)
    se = v.std(ddof=0) / math.sqrt(W)                                   # the bootstrap's own standard error
    assert (hi - lo) / (2 * 1.96 * se) == pytest.approx(1.0, abs=0.05)
    assert abs(point - v.mean()) < 1e-15


def scores_with(toy, dense_loss, sparse_loss, kl=None):
    """score()'s {label: Scores} for the toy model at S=0.5, the losses (and KL) replaced by known ones."""
    params, cfg, x, y = toy
    scores = ev.score(params, cfg, x[:2], y[:2], [ev.uniform(cfg, 0.5)])
    d, s = scores["dense"], scores["S=0.5"]
    zero = np.zeros_like(dense_loss)
    return {"dense": ev.Scores(d.plan, dense_loss, zero, np.ones(dense_loss.shape, bool), d.zeros),
            "S=0.5": ev.Scores(s.plan, sparse_loss, zero if kl is None else kl,
                               np.ones(dense_loss.shape, bool), s.zeros)}


def test_sparse_minus_dense_interval_is_paired(toy):
    """Windows whose losses differ widely, sparse always 0.01 nats above dense on the same window: a
    paired bootstrap (the same windows drawn for both rows) sees no spread in the difference, an
    unpaired one the windows' whole spread."""
    _, cfg, _, _ = toy
    W, T = 60, 8
    dense = np.repeat(np.random.default_rng(2).uniform(1.0, 4.0, W)[:, None], T, axis=1)    # (W, T)
    sparse = dense + 0.01
    idx = ev.bootstrap_indices(W, n=500, seed=0)
    rows = ev.summarize(scores_with(toy, dense, sparse), cfg, idx)
    r = rows[1]
    assert r["d_ppl"] == pytest.approx(math.expm1(0.01), rel=1e-9)
    assert r["d_ppl_lo"] == pytest.approx(math.expm1(0.01), rel=1e-9)
    assert r["d_ppl_hi"] == pytest.approx(math.expm1(0.01), rel=1e-9)
    assert r["ppl_hi"] - r["ppl_lo"] > 0.5                              # each row alone does spread
    (d, dlo, dhi), (q, qlo, qhi) = ev.paired_difference(dense, sparse, idx)
    assert d == pytest.approx(0.01, rel=1e-9) and dlo == pytest.approx(0.01, rel=1e-9)
    assert dhi == pytest.approx(0.01, rel=1e-9) and qlo == pytest.approx(math.expm1(0.01), rel=1e-9)


def test_bootstrap_resamples_whole_windows(toy):
    """Tokens within a window equal (perfectly correlated), windows independent: the interval is that
    of W values, 2 * 1.96 * sd / sqrt(W) wide; resampling the W * T tokens as if independent would
    give one sqrt(T) = 4 times narrower."""
    _, cfg, _, _ = toy
    W, T = 200, 16
    rng = np.random.default_rng(5)
    a, b = rng.normal(2.0, 0.3, W), rng.normal(0.05, 0.02, W)
    dense = np.repeat(a[:, None], T, axis=1)
    sparse = dense + np.repeat(b[:, None], T, axis=1)
    kl = np.repeat(rng.exponential(0.1, W)[:, None], T, axis=1)
    idx = ev.bootstrap_indices(W, n=2000, seed=0)
    r = ev.summarize(scores_with(toy, dense, sparse, kl), cfg, idx)[1]

    def width_ratio(lo, hi, values):
        return (hi - lo) / (2 * 1.96 * values.std() / math.sqrt(W))
    assert width_ratio(math.log(r["ppl_lo"]), math.log(r["ppl_hi"]), a + b) == pytest.approx(1.0, abs=0.12)
    assert width_ratio(math.log1p(r["d_ppl_lo"]), math.log1p(r["d_ppl_hi"]), b) == pytest.approx(1.0, abs=0.12)
    assert width_ratio(r["kl_lo"], r["kl_hi"], kl[:, 0]) == pytest.approx(1.0, abs=0.12)
    (_, dlo, dhi), _ = ev.paired_difference(dense, sparse, idx)
    assert width_ratio(dlo, dhi, b) == pytest.approx(1.0, abs=0.12)


def test_summary_row_of_dense_is_zero_change(toy):
    params, cfg, x, y = toy
    scores = ev.score(params, cfg, x, y, [ev.uniform(cfg, 0.5)])
    rows = ev.summarize(scores, cfg, ev.bootstrap_indices(len(x), n=200))
    dense, sparse = rows
    assert dense["d_ppl"] == dense["d_ppl_lo"] == dense["d_ppl_hi"] == 0.0 and dense["agree"] == 1.0
    assert abs(sparse["ppl"] - math.exp(scores["S=0.5"].loss.mean())) < 1e-9
    assert sparse["d_ppl_lo"] <= sparse["d_ppl"] <= sparse["d_ppl_hi"]


@pytest.mark.parametrize("text, want", [("2%", ("ppl", 0.02)), ("0.5%", ("ppl", 0.005)), ("kl=0.05", ("kl", 0.05))])
def test_parse_budget(text, want):
    kind, v = ev.parse_budget(text)
    assert kind == want[0] and abs(v - want[1]) < 1e-15


@pytest.mark.parametrize("text", ["2", "-1%", "kl=", "kl=-0.1", "nan%", "two%"])
def test_parse_budget_rejects(text):
    with pytest.raises(UsageError, match="--budget"):
        ev.parse_budget(text)


def test_choose_takes_the_sparsest_setting_whose_upper_end_is_within():
    rows = [dict(setting="dense", d_ppl_hi=0.0, kl_hi=0.0, na_nominal=100),
            dict(setting="S=0.3", d_ppl_hi=0.015, kl_hi=0.01, na_nominal=70),
            dict(setting="S=0.5", d_ppl_hi=0.025, kl_hi=0.02, na_nominal=50),   # estimate may be < 2%
            dict(setting="S=0.7", d_ppl_hi=0.30, kl_hi=0.2, na_nominal=30)]
    assert ev.choose(rows, ("ppl", 0.02))["setting"] == "S=0.3"
    assert ev.choose(rows, ("ppl", 0.03))["setting"] == "S=0.5"
    assert ev.choose(rows, ("kl", 0.001))["setting"] == "dense"


def test_allocation_spends_the_sparsity_where_it_costs_least():
    cfg = small_cfg(n_layer=3)
    groups = allocation.units(cfg, "layer")
    # layer 1 is free to sparsify, layers 0 and 2 cost loss: the allocation must go to layer 1 first
    curves = {g: {s: 1.0 + (0.0 if g == "layer 1" else s) for s in allocation.LEVELS} for g in groups}
    target = ev.nominal_na(cfg, ev.uniform(cfg, 0.3))
    plan, levels = allocation.allocate(cfg, groups, curves, 1.0, target)
    assert levels["layer 1"] == max(allocation.LEVELS)
    assert ev.nominal_na(cfg, plan) <= target
    assert plan.spec(1, "down").sparsity == max(allocation.LEVELS) and plan.spec(0, "qkv").sparsity <= 0.3
    with pytest.raises(UsageError, match="--allocate"):
        allocation.units(cfg, "heads")


def test_sensitivity_curves_are_the_loss_with_one_group_sparse(toy):
    params, cfg, x, y = toy
    groups = allocation.units(cfg, "site")
    curves, base = allocation.sensitivity(params, cfg, x, y, groups, model.REFERENCE, levels=(0.5,))
    assert abs(base - ev.score(params, cfg, x, y, [])["dense"].loss.mean()) < 1e-12
    specs = dict(ev.uniform(cfg).specs)
    specs.update({(l, "o"): cfg.spec_at(0.5) for l in range(cfg.n_layer)})
    want = allocation.score_loss(params, cfg, x, y, ev.Plan(specs, "o"), model.REFERENCE)
    assert curves["o"][0.5] == want and want != base


def test_fallback_thresholds_are_quantiles_of_prompt_losses():
    loss = np.random.default_rng(0).exponential(1.0, (200, 64))
    th = ev.fallback_thresholds(loss, 0.9)
    assert set(th) == {8, 16, 32, 64}
    assert abs(th[16] - np.quantile(loss[:, :15].mean(1), 0.9)) < 1e-12
    assert np.mean(ev.prompt_losses(loss, 16) > th[16]) == pytest.approx(0.1, abs=0.01)
    js = {str(k): v for k, v in th.items()}
    assert ev.threshold_for(js, 20) == (th[16], 16)
    assert ev.threshold_for(js, 5) == (th[8], 8)
    assert ev.threshold_for(js, 500) == (th[64], 64)


def test_fallback_rule_scores_the_prompt_span(tmp_path):
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"fallback": {"S=0.5": {"quantile": 0.95, "thresholds": {"2": 1.0, "8": 1.5}}}}))
    rule = ev.FallbackRule.from_report(str(path), "S=0.5")
    V = 5
    ids = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    logits = np.zeros((10, V))                                  # uniform: every token costs log 5
    dense, loss, threshold, n = rule.decide(logits, ids)
    assert dense and abs(loss - math.log(5)) < 1e-12 and threshold == 1.5 and n == 10
    logits[np.arange(9), ids[1:]] = 50.0                        # every next token predicted: loss ~ 0
    dense, loss, _, _ = rule.decide(logits, ids)
    assert not dense and loss < 1e-12
    _, _, threshold, n = rule.decide(logits, ids, span=(2, 5))   # 3 tokens scored: the "2" threshold
    assert n == 3 and threshold == 1.0
    assert ev.find_span(ids, [2, 3]) == (7, 9) and ev.find_span(ids, [4, 4]) is None
    with pytest.raises(UsageError, match="no thresholds for S=0.3"):
        ev.FallbackRule.from_report(str(path), "S=0.3")
    with pytest.raises(UsageError, match="does not exist"):
        ev.FallbackRule.from_report(str(tmp_path / "none.json"), "S=0.5")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="not an evaluate.py report"):
        ev.FallbackRule.from_report(str(tmp_path / "bad.json"), "S=0.5")


# ----------------------------------------------------------------------------- the programs

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory, "the cat sat on a mat and saw dog run to big red box", 300)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train_tiny.main(tiny(corpus, out, "--max_iters", 30, "--learning_rate", 1e-2, "--warmup_iters", 0)) == 0
    return out


@pytest.fixture(scope="module")
def report(run):
    rc = evaluate_program.main(["--out_dir", str(run), "--sparsity", "0,0.25,0.5,2:4", "--budget", "50%",
                                "--speed_tokens", "4", "--speed_rounds", "1", "--max_windows", "40"])
    assert rc == 0
    with open(os.path.join(run, "eval", "evaluation.json")) as f:
        return json.load(f)


def test_evaluate_writes_the_report(report, run):
    rows = {r["setting"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "S=0.25", "S=0.5", "2:4"]
    assert rows["dense"]["d_ppl"] == 0.0 and rows["S=0.5"]["na_nominal"] < rows["S=0.25"]["na_nominal"]
    assert report["budget"]["chosen"] in rows and report["windows"] == 40
    assert set(report["fallback"]) == {"S=0.25", "S=0.5", "2:4"}
    assert set(report["speed"]["tokens_per_s"]) == set(rows)
    with open(os.path.join(run, "eval", "evaluation.csv")) as f:
        lines = f.read().splitlines()
    assert len(lines) == 5 and lines[0].startswith("setting,ppl")
    assert not [n for n in os.listdir(os.path.join(run, "eval")) if n.startswith(".tmp")]


def test_evaluate_budget_line(run, capsys):
    rc, out, err = call(evaluate_program, ["--out_dir", run, "--sparsity", "0,0.5", "--budget", "kl=1e-9",
                                           "--speed_tokens", "0", "--report_dir", run / "kl"], capsys)
    assert rc == 0 and "budget KL 1e-09 nats: chose dense" in out


def test_ab_of_a_model_against_itself_is_zero(run, capsys):
    rc, out, err = call(evaluate_program, ["--ab", run, f"{run}@0.5", "--report_dir", run / "ab"], capsys)
    assert rc == 0 and "B - A" in out
    rc, out, err = call(evaluate_program, ["--ab", f"{run}@0.5", f"{run}@0.5", "--report_dir", run / "ab"], capsys)
    with open(run / "ab" / "ab.json") as f:
        ab = json.load(f)
    assert rc == 0 and ab["d_loss"] == [0.0, 0.0, 0.0] and "includes 0" in out


def test_generate_fallback_auto_decodes_dense_on_shifted_text_and_sparse_otherwise(run, report, capsys):
    def greedy(prompt, *extra):
        rc, out, err = call(generate, ["--out_dir", run, "--prompt", prompt, "--temperature", 0,
                                       "--max_new_tokens", 12, *extra], capsys)
        assert rc == 0, err
        return out, err

    shifted = "xxxxxxxxxxxx"                             # characters the corpus has, in no order it has
    out, err = greedy(shifted, "--fallback", "auto")
    assert "decoding dense" in err and "(dense)" in err
    assert out == greedy(shifted, "--sparsity", "0")[0]
    familiar = "the cat sat on"
    out, err = greedy(familiar, "--fallback", "auto")
    assert "decoding sparse (S=0.5)" in err
    assert out == greedy(familiar)[0]


def test_generate_fallback_auto_scores_every_position_of_the_prompt(run, report, capsys, monkeypatch):
    """The fallback's rule reads the prompt's loss: its prefill computes the head at every position
    (a plain generate.py computes it at the last only, tests/test_programs.py)."""
    seen = watch_last_only(monkeypatch)
    rc, _, err = call(generate, ["--out_dir", run, "--prompt", "the cat sat on", "--max_new_tokens", 2,
                                 "--fallback", "auto"], capsys)
    assert rc == 0, err
    assert seen[0] is False


@pytest.mark.parametrize("argv, needles", [
    (["--sparsity", "0,1.5"], ["'1.5'", "[0, 1)"]),
    (["--sparsity", "0,9:4"], ["keep=9, block=4"]),
    (["--budget", "2"], ["--budget '2'"]),
    (["--max_windows", "1"], ["--max_windows 1"]),
    (["--fallback_quantile", "1"], ["--fallback_quantile 1"]),
    (["--block", "999"], ["--block 999"]),
    (["--allocate", "layer", "--allocate_at", "0.45", "--sparsity", "0,0.5"], ["--allocate_at 0.45", "S=0.5"]),
])
def test_evaluate_bad_flags_are_one_sentence(argv, needles, run, capsys):
    rc, _, err = call(evaluate_program, ["--out_dir", run, "--speed_tokens", "0", *argv], capsys)
    assert_one_sentence(rc, err, "evaluate.py", *needles)


def test_evaluate_bad_sources_are_one_sentence(run, tmp_path, capsys):
    rc, _, err = call(evaluate_program, ["--out_dir", tmp_path / "none"], capsys)
    assert_one_sentence(rc, err, "evaluate.py", "none")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    rc, _, err = call(evaluate_program, ["--out_dir", run, "--data", empty], capsys)
    assert_one_sentence(rc, err, "evaluate.py", "empty")
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    rc, _, err = call(evaluate_program, ["--out_dir", run, "--data", short], capsys)
    assert_one_sentence(rc, err, "evaluate.py", "fewer than one window")


def test_generate_fallback_without_calibration_is_one_sentence(run, tmp_path, capsys):
    rc, _, err = call(generate, ["--out_dir", run, "--fallback", "auto", "--calibration", tmp_path / "x.json",
                                 "--max_new_tokens", 2], capsys)
    assert_one_sentence(rc, err, "generate.py", "x.json", "does not exist")
    rc, _, err = call(generate, ["--out_dir", run, "--fallback", "auto", "--sparsity", "0"], capsys)
    assert_one_sentence(rc, err, "generate.py", "--fallback auto needs a sparse model")


def test_decoding_with_a_plan_equals_the_plans_full_forward(toy):
    from minisparse.decode import decode_forward, new_cache
    from minisparse.fast.decode import DecodeWeights
    params, cfg, x, _ = toy
    specs = {(l, s): cfg.spec_at(0.25 * ((l + i) % 4)) for l in range(cfg.n_layer) for i, s in enumerate(model.SITES)}
    plan = ev.Plan(specs, "mixed")
    want = ev.plan_forward(params, cfg, x[:2], plan, model.REFERENCE)          # (2, T, V)
    for fast in (None, DecodeWeights(dict(params), cfg, "gather")):
        kv = new_cache(params, cfg, 2)
        got = [decode_forward(params, cfg, x[:2, :4], kv, plan, fast=fast)]
        got += [decode_forward(params, cfg, x[:2, t:t + 1], kv, plan, fast=fast) for t in range(4, x.shape[1])]
        np.testing.assert_allclose(np.concatenate(got, axis=1), want, rtol=1e-9, atol=1e-11)
    assert ev.Plan.from_dict(plan.to_dict(), cfg).specs == plan.specs
    with pytest.raises(UsageError, match="does not fit this model"):
        ev.Plan.from_dict({"0.qkv": 0.5}, cfg)


def test_generate_with_the_allocated_plan(run, capsys, tmp_path):
    rc, _, err = call(evaluate_program, ["--out_dir", run, "--sparsity", "0,0.5", "--allocate", "site",
                                         "--speed_tokens", 0, "--report_dir", tmp_path], capsys)
    assert rc == 0
    path = tmp_path / "evaluation.json"
    with open(path) as f:
        alloc = json.load(f)["allocation"]
    plan = ev.Plan.from_dict(alloc["sparsity"], load_run(str(run))[2])
    rc, out, err = call(generate, ["--out_dir", run, "--sparsity_plan", path, "--max_new_tokens", 5,
                                   "--temperature", 0], capsys)
    assert rc == 0 and "sparsity plan" in err and f"{alloc['na']:,} nominal" in err
    assert plan.label == "plan"
    rc, _, err = call(generate, ["--out_dir", run, "--sparsity_plan", path, "--sparsity", "0.5"], capsys)
    assert_one_sentence(rc, err, "generate.py", "cannot be combined")
    rc, _, err = call(generate, ["--out_dir", run, "--sparsity_plan", run / "eval" / "evaluation.json"], capsys)
    assert_one_sentence(rc, err, "generate.py", "not an evaluate.py --allocate report")
