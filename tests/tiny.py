"""Tiny random Llama models and a real byte-level tokenizer, built in-process (no network).

``make_tiny_model_dir(path)`` writes an ordinary Hugging Face folder (config, safetensors, tokenizer with
a chat template) that every lite verb and plain transformers can load.
"""

from __future__ import annotations

from pathlib import Path

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
