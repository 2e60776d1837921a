"""Transformers' own ``generate`` as the reference every speedup is measured against.

Greedy, the same prompt ids, the same end-of-sequence ids and the same token budget as lite's engine, so
that with exits off the two produce the same tokens and their times compare. Used by ``lite eval``,
``lite demo`` and the benchmarks; it is the only place lite calls ``generate``.
"""

from __future__ import annotations

import time

import torch

from .sampling import eos_ids


def hf_generate(lm, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    """Transformers' own greedy ``generate`` on the same ids: (new token ids, seconds)."""
    from transformers import GenerationConfig

    eos = sorted(eos_ids(lm.tokenizer, getattr(lm.model, "generation_config", None)))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
                                  pad_token_id=pad)
    ids = torch.tensor([prompt_ids], device=lm.device)
    with torch.inference_mode():
        start = time.perf_counter()
        out = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                generation_config=gen_config)
        seconds = time.perf_counter() - start
    new = out[0, len(prompt_ids):].tolist()
    for i, t in enumerate(new):  # cut at the first end-of-sequence token, as the engine stops there
        if t in eos:
            new = new[: i + 1]
            break
    return new, seconds
