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
    """Transformers' own greedy ``generate`` on the same ids: (new token ids, seconds), cut after the first
    end-of-sequence token, as the engine stops there."""
    answers, seconds = hf_generate_batch(lm, [prompt_ids], max_new_tokens)
    return answers[0], seconds


def hf_generate_batch(lm, prompts: list[list[int]], max_new_tokens: int, *, bf16: bool = False
                      ) -> tuple[list[list[int]], float]:
    """Transformers' batched greedy ``generate`` over prompts of different lengths (left padding): the new
    token ids of each prompt, cut after its first end-of-sequence token, and the seconds of the call.

    Args:
        bf16: run under bf16 autocast (faster on hardware with native bf16; greedy answers can then differ
            from float32 ones at near-ties).
    """
    eos = sorted(eos_ids(lm.tokenizer, getattr(lm.model, "generation_config", None)))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    autocast = torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
        start = time.perf_counter()
        out = lm.model.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
                                pad_token_id=pad)
        seconds = time.perf_counter() - start
    answers = []
    for row in range(len(prompts)):
        new = out[row, width:].tolist()
        for j, t in enumerate(new):  # cut after the first end-of-sequence token (the rest is padding)
            if t in eos:
                new = new[: j + 1]
                break
        answers.append(new)
    return answers, seconds
