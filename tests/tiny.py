"""Tiny random Llama models and a real byte-level tokenizer, built in-process (no network), and the few
helpers several test files share (test files import this module, never each other).

``make_tiny_model_dir(path)`` writes an ordinary Hugging Face folder (config, safetensors, tokenizer with
a chat template) that every lite verb and plain transformers can load.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer():
    """A byte-level BPE tokenizer with 256 byte tokens, a few merges and the three special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(num_layers: int = 4, hidden: int = 32, seed: int = 0, vocab_size: int | None = None,
                    tie: bool = True):
    """A random LlamaForCausalLM with GQA (4 heads, 2 KV heads), float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=tie, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    # Random init gives near-uniform logits; larger weights make argmaxes (and exits) well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model, tok


def make_tiny_model_dir(path: str | Path, **kwargs) -> Path:
    path = Path(path)
    model, tok = make_tiny_model(**kwargs)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def full_cache(lm, ids: list[int]):
    """The cache of the full model (every block, every position) after processing ``ids``: the reference
    that early-exit and speculative caches are compared against."""
    cache = lm.new_cache(len(ids))
    with torch.no_grad():
        h = lm.embed(torch.tensor([ids]))
        for k in range(1, lm.num_layers + 1):
            h = lm.run_block(k, h, cache)
    return cache


# ----------------------------------------------------------------------------- shared by several test files
# the calibration tests' rows: some held out, some filtered out by status
CALIBRATION_ROWS = [{"instruction": f"Repeat the word number {i}.", "input": "" if i % 3 else f"word {i}",
                     "output": f"number {i} number {i}", "status": "ok" if i % 5 else "bad"}
                    for i in range(10)]
VICUNA = [{"question_id": i, "category": "generic", "turns": [t]} for i, t in
          enumerate(["Name a color.", "Say hello.", "Count to three."], start=1)]


class FakeEmbedder:
    """Character-bigram counts: fast, and identical texts give identical vectors."""

    def encode(self, texts):
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for a, b in zip(t, t[1:] + " "):
                out[i, (ord(a) * 31 + ord(b)) % 64] += 1
        return out


# thresholds at which agreeing_model() drafts at every exit layer and the full model sometimes disagrees
THRESHOLDS = {1: 0.1, 2: 0.08, 3: 0.06}


def agreeing_model(num_layers=4, hidden=32, vocab=32, damp=0.8, seed=1) -> LiteModel:
    """A random tiny Llama whose blocks after the first write damped updates into the residual stream,
    so that intermediate exits often (not always) predict the final layer's token."""
    from lite.model import LiteModel

    model, tok = make_tiny_model(num_layers=num_layers, hidden=hidden, vocab_size=vocab, seed=seed)
    with torch.no_grad():
        for block in model.model.layers[1:]:
            block.self_attn.o_proj.weight.mul_(damp)
            block.mlp.down_proj.weight.mul_(damp)
    return LiteModel(model, tok)


def random_prompts(n, vocab=32, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(1, 9))] for _ in range(n)]


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom over the cells with positive expected count."""
    n = counts.sum()
    mask = probs > 0
    expected = probs[mask] * n
    return float(((counts[mask] - expected) ** 2 / expected).sum()), int(mask.sum()) - 1


# 99.9% quantiles of the chi-square distribution by degrees of freedom (scipy.stats.chi2.ppf(0.999, df))
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88,
            10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70}


def first_round_tokens(decoder, ids: list[int], n: int, vocab: int) -> tuple[torch.Tensor, list[tuple]]:
    """Run the first round after ``ids`` ``n`` times (rolling the cache back each time): counts of the
    round's first emitted token over the vocabulary, and (drafted, accepted, first token) per round."""
    counts, rounds = torch.zeros(vocab), []
    with torch.inference_mode():
        decoder._prefill([0])
        decoder._activate([0])
        for _ in range(n):
            decoder.cache.truncate(0, len(ids) - 1)
            emitted, d, j = decoder._round(0)  # the row's budget: its max_new_tokens
            counts[emitted[0][0]] += 1
            rounds.append((d, j, emitted[0][0]))
    return counts, rounds


def with_ranking(lm: LiteModel, folder, ranking) -> LiteModel:
    """``lm`` with an exit/draft vocabulary ranking saved into ``folder`` (where lite looks for it)."""
    from lite.decoding.draft_vocab import save_ranking

    save_ranking(folder, ranking, tokens=len(ranking), source="test")
    lm.folder = str(folder)
    return lm


def decode_joining(d, prompts: list[list[int]], settings: list, long_settings, first: int = 1) -> dict:
    """Continuous batching as a server sees it, on an open :class:`lite.decoding.engine.Decoder` ``d``: prompt 0
    and a long-running copy of prompt 2 (``long_settings``) start; after ``first`` steps the long row is
    cancelled and prompt 1 takes its slot; a step later the rest join together. Returns {prompt index:
    GenerationResult} of every finished row (each released once read)."""
    rows = {d.add(prompts[0], settings[0]): 0}
    cancelled = d.add(prompts[2], long_settings)
    got, steps = {}, 0
    while d.active or len(got) < len(prompts):
        if steps == first:
            d.release(cancelled)  # cancelled mid-way: its slot goes to the next row
            assert cancelled not in d.active
            r = d.add(prompts[1], settings[1])
            assert r == cancelled
            rows[r] = 1
        if steps == first + 1:
            rows.update(zip(d.add_many(prompts[2:], settings[2:]), range(2, len(prompts))))
        for r, _, finished in d.step():
            if finished and r in rows:
                got[rows[r]] = d.result(r)
                d.release(r)
        steps += 1
        assert steps < 100
    return got
