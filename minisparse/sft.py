"""Supervised finetuning (SFT) data: instruction examples, the chat template, masked batches.

An example is a prompt and a response. The chat template turns it into one token sequence

    s = encode(template.prompt(prompt)) + encode(response + end)        lengths P + R
      = <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n | {response}<|im_end|>

and the model learns only the response (the paper's SFT, Sec. 4.4): with x = s[:-1] and
y = s[1:], the targets y[t] for t < P - 1 are prompt tokens and are set to loss.IGNORE, so
the first counted target is the response's first token, predicted from the prompt's last.
A batch holds B examples, each one a row, right-padded to the longest row of the batch; the
padding's targets are IGNORE too, and padding comes after every real token, so causal
attention never lets a real token see it. An example longer than block_size + 1 tokens keeps
its prompt whole and its response cut; a prompt that alone fills the context is an error.

    x: (B, T) int64      token ids, padded with pad_id        T = the longest row, <= block_size
    y: (B, T) int64      next tokens; IGNORE at the prompt and the padding

Sets (load_set; the split is made with SPLIT_SEED, so --seed changes the order of training,
never which examples are held out):
    "tasks"  templated tasks whose answers are checked exactly: two-digit addition, copying and
             reversing a random word, sorting four digits, and a Python fact (the topic key of a
             pydoc_data topic's title). TASK_TRAIN and TASK_TEST items of each kind (the fact:
             one per topic), test prompts never seen in training, fact topics held out.
    "pydoc"  pydoc_data's topics as question and answer: 'Explain the Python topic "with".' ->
             the topic's reference text; HELD_OUT of the distinct topics are the test set.
    Topics whose texts are the same ("if" and "else") are one topic (topic_groups), so the
    split is by content: no held-out prompt or text is trained on.
    "mix"    both.
    a .jsonl file, one {"prompt": ..., "response": ...} object a line; every tenth is held out.

The chat template: SmolLM2-Instruct's own (ChatML with its system turn, pretrained.chat_prompt)
for a pretrained model, whose tokenizer has <|im_start|> and <|im_end|> as single tokens; a
GGUF tokenizer without them cannot learn them, so that is an error. A tiny model's tokenizer,
trained by train_tiny.py on its corpus, gets the two markers added as new tokens (add_markers),
with new embedding rows (grow_embeddings): as characters they would cost ten tokens each of a
short context, and the end of a turn could not be one stop token. The checkpoint records the
template and the tokenizer with its markers, so generate.py prompts and stops as it was tuned.
"""

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from .errors import UsageError
from .loss import IGNORE

SETS = ("tasks", "pydoc", "mix")
SPLIT_SEED = 2024
TASK_TRAIN = 400          # training items per task kind
TASK_TEST = 40            # test items per task kind
HELD_OUT = 12             # pydoc topics held out
TASK_KINDS = ("add", "copy", "reverse", "sort", "fact")
RESPONSE_CHARS = 2000     # a pydoc answer is cut here before tokenizing (the context cuts it further)


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    kind: str = ""        # the task kind, or "pydoc" / "file"


# ----------------------------------------------------------------------------- the sets

def _topics():
    from pydoc_data.topics import topics        # the standard library's reference docs
    return {k: topics[k] for k in sorted(topics)}


def _title(text):
    """The first line of a topic's text, its title: 'The "assert" statement'."""
    return text.strip().split("\n", 1)[0].strip()


def topic_groups():
    """{representative key: (every key with that text, text)}, one entry per distinct text: some
    topics share theirs ("if" and "else"), and the split is made by content, so that no prompt is
    asked with two answers and no held-out text is also trained on. The representative is the key
    the title quotes ('The "if" statement' -> "if"), else the first key."""
    by_text = {}
    for key, text in _topics().items():
        by_text.setdefault(text.strip()[:RESPONSE_CHARS], []).append((key, text))    # as pydoc answers it
    out = {}
    for pairs in by_text.values():
        keys, text = [k for k, _ in pairs], pairs[0][1]
        quoted = [k for k in keys if f'"{k}"' in _title(text)]
        out[(quoted or keys)[0]] = (tuple(keys), text)
    return dict(sorted(out.items()))


def held_out_topics(seed=SPLIT_SEED):
    """The representative keys of the HELD_OUT distinct topics held out for testing."""
    reps = sorted(topic_groups())
    rng = np.random.default_rng(seed)
    return sorted(reps[i] for i in rng.choice(len(reps), HELD_OUT, replace=False))


def pydoc_examples(seed=SPLIT_SEED):
    """{"train": [...], "test": [...]}: each distinct topic as 'Explain ...' -> its reference text."""
    test = set(held_out_topics(seed))
    out = {"train": [], "test": []}
    for key, (_, text) in topic_groups().items():
        ex = Example(f'Explain the Python topic "{key}".', text.strip()[:RESPONSE_CHARS], "pydoc")
        out["test" if key in test else "train"].append(ex)
    return out


def _word(rng):
    return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), int(rng.integers(4, 8))))


def _task(kind, rng):
    if kind == "add":
        a, b = (int(v) for v in rng.integers(10, 100, 2))
        return Example(f"What is {a} + {b}?", str(a + b), kind)
    if kind == "copy":
        w = _word(rng)
        return Example(f"Repeat exactly: {w}", w, kind)
    if kind == "reverse":
        w = _word(rng)
        return Example(f"Reverse the letters: {w}", w[::-1], kind)
    if kind == "sort":
        d = [int(v) for v in rng.choice(10, 4, replace=False)]
        return Example("Sort ascending: " + ", ".join(map(str, d)), ", ".join(map(str, sorted(d))), kind)
    raise ValueError(kind)


def task_examples(seed=SPLIT_SEED):
    """{"train": [...], "test": [...]}: TASK_TRAIN / TASK_TEST items of each kind; no test prompt is
    also a training prompt; the fact items' test topics are pydoc's held-out topics."""
    rng = np.random.default_rng(seed)
    out = {"train": [], "test": []}
    for kind in TASK_KINDS[:-1]:
        test, seen = [], set()
        while len(test) < TASK_TEST:
            ex = _task(kind, rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                test.append(ex)
        train = []
        while len(train) < TASK_TRAIN:
            ex = _task(kind, rng)
            if ex.prompt not in seen:          # repeats within training are allowed, test items never
                train.append(ex)
        out["train"] += train
        out["test"] += test
    held = set(held_out_topics(seed))
    for key, (_, text) in topic_groups().items():
        ex = Example(f'Topic key of "{_title(text)}"?', key, "fact")
        out["test" if key in held else "train"].append(ex)
    return out


def file_examples(path):
    """A .jsonl file of {"prompt", "response"} objects; every tenth example is held out."""
    if not os.path.isfile(path):
        raise UsageError(f"--sft {path!r}: no such file; use {', '.join(SETS)} or a .jsonl file of "
                         '{"prompt": ..., "response": ...} lines.')
    out = {"train": [], "test": []}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ex = Example(d["prompt"], d["response"], "file")
                if not (isinstance(ex.prompt, str) and isinstance(ex.response, str)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"--sft {path!r} line {n} is not a JSON object with string fields "
                                 '"prompt" and "response".') from None
            i = len(out["train"]) + len(out["test"])
            out["test" if i % 10 == 9 else "train"].append(ex)
    return out


def load_set(name):
    """{"train": [Example], "test": [Example]} of an SFT set: a name of SETS or a .jsonl file.
    Raises UsageError for an empty set or an empty response."""
    if name == "tasks":
        sets = task_examples()
    elif name == "pydoc":
        sets = pydoc_examples()
    elif name == "mix":
        t, p = task_examples(), pydoc_examples()
        sets = {"train": t["train"] + p["train"], "test": t["test"] + p["test"]}
    elif str(name).endswith(".jsonl"):
        sets = file_examples(name)
    else:
        raise UsageError(f"--sft {name!r} is not known: use {', '.join(SETS)} or a .jsonl file.")
    if not sets["train"]:
        raise UsageError(f"the SFT set {name!r} has no training examples: it needs at least one "
                         '{"prompt": ..., "response": ...}.')
    for split, examples in sets.items():
        for i, ex in enumerate(examples):
            if ex.response.strip() == "":
                raise UsageError(f"the SFT set {name!r} has an empty response ({split} example {i}, prompt "
                                 f"{ex.prompt[:40]!r}): there would be nothing to learn from it.")
    return sets


# ----------------------------------------------------------------------------- the chat template

@dataclass(frozen=True)
class ChatTemplate:
    """ChatML: each turn is start + role + newline + text + end + newline."""
    start: str = "<|im_start|>"
    end: str = "<|im_end|>"
    system: str | None = None            # a system turn before the user's, or none

    def prompt(self, user_text):
        """Everything before the response: the turns, then the opened assistant turn."""
        sys_turn = f"{self.start}system\n{self.system}{self.end}\n" if self.system is not None else ""
        return f"{sys_turn}{self.start}user\n{user_text}{self.end}\n{self.start}assistant\n"

    def markers(self):
        return (self.start, self.end)

    def end_id(self, tok):
        """The one token that ends a turn: the stop token when generating."""
        return marker_id(tok, self.end)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        try:
            return cls(**d)
        except TypeError:
            raise UsageError(f"the saved chat template {d!r} is not one: it needs start, end and system.") from None


# the template SmolLM2-Instruct was tuned with (pretrained.chat_prompt applies it)
SMOLLM2 = ChatTemplate(system="You are a helpful AI assistant named SmolLM, trained by Hugging Face")
TINY = ChatTemplate()


def template_of(meta):
    """The chat template a checkpoint's run was finetuned with, or None (not finetuned)."""
    d = meta.get("sft") if isinstance(meta, dict) else None
    return ChatTemplate.from_dict(d["template"]) if isinstance(d, dict) and "template" in d else None


def marker_id(tok, marker):
    """The id of a template marker, which must be one token of `tok`."""
    try:
        ids = tok.encode(marker)
    except UsageError:
        ids = []
    if len(ids) != 1:
        raise UsageError(f"the chat template's marker {marker!r} is not a single token of this tokenizer "
                         f"(it encodes to {len(ids)} tokens): a pretrained model's tokenizer must have it.")
    return ids[0]


def add_markers(tok, template):
    """A train_tiny.py tokenizer with the template's markers added as new tokens (ids V, V + 1);
    one that already has them is returned as it is."""
    missing = []
    for m in template.markers():
        try:
            marker_id(tok, m)
        except UsageError:
            missing.append(m)
    return tok.with_specials(missing) if missing else tok


def grow_embeddings(params, cfg, V_new):
    """Rows for new tokens in the embedding and the untied head, each the mean of the old rows:
    a new token starts as an average token, so the first steps' loss does not spike on it."""
    from . import backend
    V = cfg.vocab_size
    if V_new == V:
        return params
    params = dict(params)
    for name in ("wte", "lm_head"):
        if name in params:
            W = backend.to_numpy(params[name])
            extra = np.repeat(W.mean(axis=0, keepdims=True), V_new - V, axis=0)
            params[name] = backend.asarray(np.concatenate([W, extra]), dtype=W.dtype)
    return params


# ----------------------------------------------------------------------------- tokens and batches

@dataclass
class Encoded:
    ids: list             # prompt and response tokens, cut to block_size + 1
    n_prompt: int         # P: the first P tokens are the prompt


def encode(tok, template, ex, block_size, where=""):
    """An Example as token ids (Encoded). The response is cut to fit block_size + 1 tokens."""
    p = tok.encode(template.prompt(ex.prompt))
    r = tok.encode(ex.response + template.end)
    if len(p) >= block_size:
        raise UsageError(f"the prompt of {where or 'an SFT example'} ({ex.prompt[:40]!r}...) is {len(p)} tokens "
                         f"with the chat template, which leaves no room for a response in block_size={block_size}: "
                         "shorten it or give a longer --block_size.")
    return Encoded((p + r)[:block_size + 1], len(p))


def encode_all(tok, template, examples, block_size, name="train"):
    return [encode(tok, template, ex, block_size, f"{name} example {i}") for i, ex in enumerate(examples)]


def make_batch(encoded, pad_id=0):
    """Rows of Encoded -> x, y (B, T), T the longest row's length - 1; prompt and padding targets IGNORE."""
    T = max(len(e.ids) for e in encoded) - 1
    B = len(encoded)
    x = np.full((B, T), pad_id, dtype=np.int64)                   # (B, T)
    y = np.full((B, T), IGNORE, dtype=np.int64)                   # (B, T)
    for b, e in enumerate(encoded):
        n = len(e.ids) - 1                                        # positions of this row
        x[b, :n] = e.ids[:-1]
        y[b, :n] = e.ids[1:]
        y[b, :e.n_prompt - 1] = IGNORE                            # targets that are prompt tokens
    return x, y


def steps_per_epoch(n_examples, batch_size):
    return math.ceil(n_examples / batch_size)


def batch_at(encoded, it, batch_size, seed, pad_id=0):
    """The batch of step `it`: epoch e = it // steps visits every example once, in a permutation
    drawn from (seed, e); the last batch of an epoch may be smaller. It depends on nothing but
    `it`, so a resumed run sees exactly the batches of one that never stopped."""
    steps = steps_per_epoch(len(encoded), batch_size)
    epoch, i = divmod(it, steps)
    order = np.random.default_rng([seed, epoch]).permutation(len(encoded))
    rows = order[i * batch_size:(i + 1) * batch_size]
    return make_batch([encoded[r] for r in rows], pad_id)


def batches_in_order(encoded, batch_size, pad_id=0):
    """Every example once, in order, batch_size a batch (evaluation)."""
    for s in range(0, len(encoded), batch_size):
        yield make_batch(encoded[s:s + batch_size], pad_id)


def response_scores(params, cfg, encoded, batch_size, ops, limit=None):
    """(mean loss over the response tokens of `encoded` (the first `limit` examples), the measured
    sparsity {site: fraction of zeros, averaged over layers and batches}). Every counted token
    weighs the same: the sum of the batches' means times their counts, over the total count."""
    from . import backend, model
    total, count, n_batches = 0.0, 0, 0
    zeros = {site: 0.0 for site in model.SITES}
    for x, y in batches_in_order(encoded[:limit], batch_size):
        loss, per_layer = model.forward_loss(params, cfg, backend.asarray(x), backend.asarray(y), ops)
        n = int((y != IGNORE).sum())
        total, count, n_batches = total + loss * n, count + n, n_batches + 1
        for site, frac in model.average_over_layers(per_layer).items():
            zeros[site] += frac
    return total / max(count, 1), {site: z / max(n_batches, 1) for site, z in zeros.items()}


def response_loss(params, cfg, encoded, batch_size, ops, limit=None):
    """The first of response_scores: the mean loss over the response tokens."""
    return response_scores(params, cfg, encoded, batch_size, ops, limit)[0]


def exact_match(answer, reference):
    """The checkable tasks' score: the generated answer, stripped, equals the reference."""
    return answer.strip() == reference.strip()


def wilson(k, n, z=1.96):
    """The Wilson score interval (95% for z = 1.96) of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, c - h), min(1.0, c + h))

