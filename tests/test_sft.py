"""Supervised finetuning (minisparse/sft.py, train_tiny.py --sft): the loss counts the response
tokens only, padding changes nothing, the sets are deterministic and split without overlap,
a finetuning run resumes exactly, generate.py applies the template it was tuned with and stops at
the end of the turn, and every bad input is one sentence that leaves nothing behind."""

import inspect
import json
import os

import numpy as np
import pytest

import generate
import train_tiny
from minisparse import model, sft
from minisparse.data import CharTokenizer, tokenizer_from_dict
from minisparse.errors import UsageError
from minisparse.loss import IGNORE
from minisparse.run import load_run, read_metrics
from conftest import write_corpus
from test_programs import assert_one_sentence, call, losses, tiny

CHARS = list(" +0123456789:?abcdefghijklmnopqrstuvwxyz\n")


def tok_and_cfg(**kw):
    tok = CharTokenizer(CHARS).with_specials(["<|im_start|>", "<|im_end|>"])
    cfg = model.GPTConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, n_embd=16,
                          n_hidden=32, **kw)
    return tok, cfg


EXAMPLES = [sft.Example("what is 2 + 3?", "5"), sft.Example("copy: abcde", "abcde"),
            sft.Example("x?", "a long answer here")]


def test_batch_masks_the_prompt_and_the_padding():
    tok, _ = tok_and_cfg()
    enc = sft.encode_all(tok, sft.TINY, EXAMPLES, 48)
    x, y = sft.make_batch(enc)
    T = max(len(e.ids) for e in enc) - 1
    assert x.shape == y.shape == (3, T)
    for b, e in enumerate(enc):
        P, n = e.n_prompt, len(e.ids) - 1
        assert e.ids[:P] == tok.encode(sft.TINY.prompt(EXAMPLES[b].prompt))
        assert tok.decode(e.ids[P:]) == EXAMPLES[b].response + "<|im_end|>"
        assert np.all(y[b, :P - 1] == IGNORE)                     # targets that are prompt tokens
        assert y[b, P - 1] == e.ids[P]                             # the first response token, from the last prompt token
        assert list(y[b, P - 1:n]) == e.ids[P:]                    # the whole response, its end marker included
        assert np.all(y[b, n:] == IGNORE) and np.all(x[b, n:] == 0)   # padding, after every real token
        assert list(x[b, :n]) == e.ids[:-1]


def test_prompt_targets_get_no_gradient():
    """The gradient of a masked batch is the mean of the gradients of its response tokens taken one
    at a time, so no prompt target (nor padding) enters it: changing one changes nothing."""
    tok, cfg = tok_and_cfg(sparsity=0.5)
    params = model.init_params(cfg, seed=3, dtype=np.float64)
    x, y = sft.make_batch(sft.encode_all(tok, sft.TINY, EXAMPLES[:2], 48))
    grads = model.backward(params, cfg, model.forward(params, cfg, x, y)[2])
    counted = np.argwhere(y != IGNORE)
    summed = {k: np.zeros_like(v) for k, v in params.items()}
    for b, t in counted:                                            # each response token on its own
        y1 = np.full_like(y, IGNORE)
        y1[b, t] = y[b, t]
        g = model.backward(params, cfg, model.forward(params, cfg, x, y1)[2])
        for k in summed:
            summed[k] += g[k] / len(counted)
    for k in grads:
        np.testing.assert_allclose(grads[k], summed[k], rtol=0, atol=1e-13, err_msg=k)
    # the same batch with its prompt targets unmasked (the next prompt token, as pretraining counts
    # them) has another gradient: the test above would see a leak
    y_full = y.copy()
    y_full[:, :-1][y[:, :-1] == IGNORE] = x[:, 1:][y[:, :-1] == IGNORE]
    g_full = model.backward(params, cfg, model.forward(params, cfg, x, y_full)[2])
    assert not np.allclose(g_full["wte"], grads["wte"])


def test_padding_changes_no_loss_or_gradient():
    """An example padded inside a batch with a longer one gives what it gives alone: the batch's
    loss and gradient are the examples' own, weighted by their response tokens."""
    tok, cfg = tok_and_cfg(sparsity=0.5)
    params = model.init_params(cfg, seed=4, dtype=np.float64)
    enc = sft.encode_all(tok, sft.TINY, [EXAMPLES[0], EXAMPLES[2]], 48)
    x, y = sft.make_batch(enc)
    _, loss, caches = model.forward(params, cfg, x, y)
    grads = model.backward(params, cfg, caches)
    total, g_sum, n_sum = 0.0, {k: 0.0 for k in params}, 0
    for e in enc:
        x1, y1 = sft.make_batch([e])                               # alone: no padding
        n = int((y1 != IGNORE).sum())
        _, l1, c1 = model.forward(params, cfg, x1, y1)
        g1 = model.backward(params, cfg, c1)
        total, n_sum = total + float(l1) * n, n_sum + n
        for k in g_sum:
            g_sum[k] = g_sum[k] + g1[k] * n
    assert float(loss) == pytest.approx(total / n_sum, rel=1e-13)
    for k in grads:
        np.testing.assert_allclose(grads[k], g_sum[k] / n_sum, rtol=0, atol=1e-13, err_msg=k)


def test_a_long_response_is_cut_and_a_long_prompt_is_an_error():
    tok, _ = tok_and_cfg()
    e = sft.encode(tok, sft.TINY, sft.Example("x?", "a" * 100), 48)
    assert len(e.ids) == 49 and e.n_prompt == len(tok.encode(sft.TINY.prompt("x?")))
    with pytest.raises(UsageError, match="block_size=48"):
        sft.encode(tok, sft.TINY, sft.Example("a" * 40, "b"), 48)


def test_sets_are_deterministic_and_held_out_items_are_never_trained_on():
    a, b = sft.load_set("mix"), sft.load_set("mix")
    assert a == b
    train_prompts = {e.prompt for e in a["train"]}
    assert not train_prompts & {e.prompt for e in a["test"]}
    kinds = [e.kind for e in sft.task_examples()["test"]]
    for k in sft.TASK_KINDS[:-1]:
        assert kinds.count(k) == sft.TASK_TEST
    assert kinds.count("fact") == sft.HELD_OUT
    held = set(sft.held_out_topics())
    assert {e.response for e in sft.task_examples()["test"] if e.kind == "fact"} == held
    for e in a["train"]:                                           # the answers are right
        if e.kind == "add":
            x, y = e.prompt[len("What is "):-1].split(" + ")
            assert int(e.response) == int(x) + int(y)
        elif e.kind == "reverse":
            assert e.response == e.prompt.split(": ")[1][::-1]
        elif e.kind == "sort":
            assert e.response == ", ".join(sorted(e.prompt.split(": ")[1].split(", "), key=int))


@pytest.mark.parametrize("seed", [sft.SPLIT_SEED, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
def test_no_test_prompt_or_response_is_trained_on_for_any_split_seed(seed):
    """The split is by content: topics with one text ("if" and "else") are one topic, so no held-out
    prompt or pydoc answer (nor fact answer) is also a training one, and no prompt has two answers."""
    pydoc, tasks = sft.pydoc_examples(seed), sft.task_examples(seed)
    for name, sets in (("pydoc", pydoc), ("tasks", tasks)):
        train_prompts = {e.prompt for e in sets["train"]}
        leaked = [e.prompt for e in sets["test"] if e.prompt in train_prompts]
        assert not leaked, (name, seed, leaked)
    assert not {e.response for e in pydoc["test"]} & {e.response for e in pydoc["train"]}, seed
    facts = {s: [e for e in tasks[s] if e.kind == "fact"] for s in ("train", "test")}
    assert not {e.response for e in facts["test"]} & {e.response for e in facts["train"]}, seed
    for examples in (pydoc["train"] + pydoc["test"], facts["train"] + facts["test"]):
        answers = {}
        for e in examples:
            answers.setdefault(e.prompt, set()).add(e.response)
        assert all(len(a) == 1 for a in answers.values()), [p for p, a in answers.items() if len(a) > 1]
        assert len({e.response for e in examples}) == len(examples)          # each text once
    assert len(pydoc["test"]) == len(facts["test"]) == sft.HELD_OUT


def test_response_scores_weigh_every_response_token_equally():
    """Batches of very different response lengths: the mean is over tokens (the loss of all of them
    in one batch, where padding changes nothing), not the mean of the batches' means."""
    tok, cfg = tok_and_cfg(sparsity=0.5)
    params = model.init_params(cfg, seed=5, dtype=np.float64)
    examples = [sft.Example("x?", "a"), sft.Example("y?", "b"),
                sft.Example("z?", "the long answer with many tokens in it")]
    enc = sft.encode_all(tok, sft.TINY, examples, 48)
    x, y = sft.make_batch(enc)                                        # every token, one batch
    want = float(model.forward_loss(params, cfg, x, y, model.REFERENCE)[0])
    by_batch = [float(model.forward_loss(params, cfg, *sft.make_batch(enc[s:s + 2]), model.REFERENCE)[0])
                for s in (0, 2)]
    assert abs(np.mean(by_batch) - want) > 1e-3                         # the two means differ here
    got, zeros = sft.response_scores(params, cfg, enc, 2, model.REFERENCE)
    assert got == pytest.approx(want, rel=1e-12)
    assert set(zeros) == set(model.SITES)


def test_epoch_batches_visit_every_example_once_and_depend_on_the_step_alone():
    tok, _ = tok_and_cfg()
    enc = sft.encode_all(tok, sft.TINY, [sft.Example(f"q{i}?", "a" * (i + 1)) for i in range(7)], 48)
    seen = []
    for it in range(sft.steps_per_epoch(7, 3)):                    # 3 + 3 + 1
        x, y = sft.batch_at(enc, it, 3, seed=5)
        seen += [int((row != IGNORE).sum()) - 1 for row in y]      # the answer's length (minus its end)
    assert sorted(seen) == list(range(1, 8))
    assert all(np.array_equal(a, b) for a, b in zip(sft.batch_at(enc, 4, 3, 5), sft.batch_at(enc, 4, 3, 5)))


def test_markers_are_added_to_a_tiny_tokenizer_and_recorded():
    tok = CharTokenizer(CHARS)
    tok2 = sft.add_markers(tok, sft.TINY)
    assert tok2.vocab_size == tok.vocab_size + 2
    text = sft.TINY.prompt("what is 1 + 2?") + "3<|im_end|>"
    ids = tok2.encode(text)
    assert tok2.decode(ids) == text and ids[-1] == sft.TINY.end_id(tok2) == tok.vocab_size + 1
    assert tokenizer_from_dict(tok2.to_dict()).encode(text) == ids
    assert sft.add_markers(tok2, sft.TINY) is tok2
    cfg = model.GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=8, n_hidden=16)
    params = sft.grow_embeddings(model.init_params(cfg), cfg, tok2.vocab_size)
    assert params["wte"].shape == (tok2.vocab_size, 8) and params["lm_head"].shape == (tok2.vocab_size, 8)
    np.testing.assert_allclose(params["wte"][-1], params["wte"][:-2].mean(axis=0), rtol=1e-6)


def test_a_marker_missing_from_a_pretrained_tokenizer_is_one_sentence():
    with pytest.raises(UsageError, match=r"marker '<\|im_end\|>' is not a single token"):
        sft.marker_id(CharTokenizer(CHARS + ["<", ">", "|", "_"]), "<|im_end|>")


def test_wilson_interval():
    lo, hi = sft.wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert sft.wilson(0, 10)[0] == 0.0 and sft.wilson(10, 10)[1] == 1.0


# ----------------------------------------------------------------------------- the programs

SFT_TINY = ["--batch_size", "4", "--eval_interval", "3", "--eval_iters", "1", "--learning_rate", "1e-2"]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~3 KB of words over every lowercase letter (the chat template's roles are spelled with them)."""
    return write_corpus(tmp_path_factory, "the quick brown fox jumps over a lazy dog and says its name to user "
                        "assistant", 120)


@pytest.fixture(scope="module")
def pre_run(corpus, tmp_path_factory):
    """A tiny pretrained run with a context long enough for a chat example."""
    out = tmp_path_factory.mktemp("pre")
    assert train_tiny.main(tiny(corpus, out, "--block_size", 48)) == 0
    return out


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    words = "the cat sat on a mat and saw dog".split()
    rows = [{"prompt": f"say {w}", "response": w} for w in words] + [{"prompt": "say run", "response": "run"}]
    return jsonl(tmp_path_factory.mktemp("qa") / "qa.jsonl", rows)


def test_sft_run_records_template_defaults_and_counts_response_tokens(pre_run, qa_file, tmp_path, capsys):
    out = tmp_path / "ft"
    rc, stdout, _ = call(train_tiny, ["--init_from", pre_run, "--sft", qa_file, "--out_dir", out, *SFT_TINY], capsys)
    assert rc == 0, stdout
    _, _, cfg, tok, meta = load_run(out)
    assert meta["sft"]["template"] == sft.TINY.to_dict() and meta["sft"]["set"] == str(qa_file)
    assert tok.encode("<|im_end|>") == [tok.vocab_size - 1] and cfg.vocab_size == tok.vocab_size
    t = meta["train"]
    assert t["max_iters"] == 3 and t["weight_decay"] == 0.0 and t["min_lr"] == 0.0   # one epoch of 9 at batch 4
    assert t["warmup_iters"] == round(0.03 * 3)
    steps, _ = read_metrics(out)
    x = sum(m["response_tokens"] for m in steps)
    assert x == sum(len(w) + 1 for w in "the cat sat on a mat and saw dog".split())   # each answer + its end, once


def test_sft_resume_equals_a_run_that_never_stopped(pre_run, qa_file, tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["--init_from", pre_run, "--sft", qa_file, *SFT_TINY, "--max_iters", 6]
    assert call(train_tiny, [*argv, "--out_dir", a], capsys)[0] == 0
    stop = {"n": 0}
    real = sft.batch_at

    def interrupting(*args, **kw):               # Ctrl-C during the step at iter 2
        stop["n"] += 1
        if stop["n"] == 3:
            os.kill(os.getpid(), 2)
        return real(*args, **kw)
    monkeypatch.setattr(sft, "batch_at", interrupting)
    rc, out, _ = call(train_tiny, [*argv, "--out_dir", b], capsys)
    monkeypatch.undo()
    assert rc == 0 and "interrupted: saved the run at iter 3" in out
    rc, out, _ = call(train_tiny, ["--resume", "--out_dir", b], capsys)
    assert rc == 0 and "done: iter 6" in out
    assert losses(a) == losses(b)
    pa, _, _, _, ma = load_run(a)
    pb, _, _, _, mb = load_run(b)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa) and ma["sft"] == mb["sft"]


def test_generate_applies_the_tuned_template_and_stops_at_the_end_of_the_turn(pre_run, qa_file, tmp_path,
                                                                              capsys, monkeypatch):
    out = tmp_path / "ft"
    assert call(train_tiny, ["--init_from", pre_run, "--sft", qa_file, "--out_dir", out, *SFT_TINY], capsys)[0] == 0
    _, _, _, tok, _ = load_run(out)
    seen = {}
    real = generate.generate

    def spy(*args, **kw):
        bound = inspect.signature(real).bind(*args, **kw).arguments
        seen["prompt"], seen["stop"] = bound["prompt_ids"][0].tolist(), bound.get("stop_id")
        return real(*args, **kw)
    monkeypatch.setattr(generate, "generate", spy)
    rc, stdout, _ = call(generate, ["--out_dir", out, "--prompt", "say cat", "--temperature", 0,
                                    "--max_new_tokens", 10], capsys)
    assert rc == 0
    assert seen["prompt"] == tok.encode(sft.TINY.prompt("say cat"))
    assert seen["stop"] == tok.encode("<|im_end|>")[0]
    assert stdout.startswith("say cat\n") and "<|im_end|>" not in stdout and "<|im_start|>" not in stdout


@pytest.mark.parametrize("rows, needles", [
    ([], ["no training examples"]),
    ([{"prompt": f"say {i}", "response": "x" if i != 4 else " "} for i in range(12)], ["empty response"]),
    ([{"prompt": "y" * 80, "response": "x"}] * 12, ["block_size=48", "prompt"]),
    ([{"prompt": "a", "response": "b"}] * 3, ["at least 10 examples"]),
    (None, ["not a JSON object"]),
])
def test_bad_sft_data_is_one_sentence_and_writes_nothing(rows, needles, pre_run, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    if rows is None:
        path.write_text('{"prompt": "a"}\n', encoding="utf-8")
    else:
        jsonl(path, rows)
    out = tmp_path / "ft"
    rc, _, err = call(train_tiny, ["--init_from", pre_run, "--sft", path, "--out_dir", out, *SFT_TINY], capsys)
    assert_one_sentence(rc, err, "train_tiny.py", *needles)
    assert not out.exists(), "a rejected run left its out_dir behind"


def test_sft_needs_init_from_and_a_known_set(pre_run, tmp_path, capsys):
    rc, _, err = call(train_tiny, ["--sft", "tasks", "--out_dir", tmp_path / "x"], capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "--init_from")
    rc, _, err = call(train_tiny, ["--init_from", pre_run, "--sft", "nope", "--out_dir", tmp_path / "x"], capsys)
    assert_one_sentence(rc, err, "train_tiny.py", "'nope'", "tasks")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- SmolLM2

def test_smollm2_masks_its_chat_prompt():
    """SmolLM2's tokenizer has the markers as single tokens; the masked loss of a chat example is the
    mean of the response tokens' own losses, computed here from the logits."""
    pytest.importorskip("gguf")
    from minisparse.pretrained import chat_prompt, load_gguf
    try:
        params, cfg, tok, _ = load_gguf("smollm2", block_size=64)
    except UsageError as e:
        pytest.skip(str(e))
    assert sft.SMOLLM2.prompt("Hi?") == chat_prompt("Hi?")          # the template generate.py uses
    assert chat_prompt("Hi?") == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                                  "Hugging Face<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n")
    assert len(tok.encode("<|im_start|>")) == len(tok.encode("<|im_end|>")) == 1
    e = sft.encode(tok, sft.SMOLLM2, sft.Example("What is 2 + 3?", "5"), 64)
    x, y = sft.make_batch([e])
    assert np.all(y[0, :e.n_prompt - 1] == IGNORE) and (y[0] != IGNORE).sum() == len(e.ids) - e.n_prompt
    logits, loss, _ = model.forward(params, cfg, x, y)
    z = logits[0].astype(np.float64)
    logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    counted = np.flatnonzero(y[0] != IGNORE)
    assert float(loss) == pytest.approx(-logp[counted, y[0, counted]].mean(), rel=1e-5)
