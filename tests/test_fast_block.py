"""The fast path of plain Llama blocks (lite.model.fast_block) is bitwise the model's own modules, and steps
aside wherever that is not known to hold."""

import pytest
import torch
from torch import nn

from lite.model.adapter import LiteModel
from lite.model.fast_block import fast_blocks

from tiny import make_tiny_model


def _run(lm: LiteModel, fast: bool, ids: torch.Tensor, rows_starts) -> list[torch.Tensor]:
    """Block outputs of a prefill of ``ids`` (every row) then one step of a subset of rows, fast or not."""
    cache = lm.new_cache(32, batch=ids.shape[0])
    if not fast:
        lm._fast = None
    outs = []
    with torch.no_grad():
        h = lm.embed(ids)
        for k in range(1, lm.num_layers + 1):
            h = lm.run_block(k, h, cache)
            outs.append(h)
        rows = rows_starts
        h = lm.embed(ids[rows, -1:])
        for k in range(1, lm.num_layers + 1):
            h = lm.run_block(k, h, cache, rows)
            outs.append(h)
    outs.extend(cache.keys + cache.values)
    return outs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_blocks_equal_the_modules_bitwise(dtype):
    model, tok = make_tiny_model(num_layers=3, hidden=32)
    lm = LiteModel(model.to(dtype), tok)
    ids = torch.randint(3, 200, (3, 6), generator=torch.Generator().manual_seed(0))
    fast = _run(lm, True, ids, [2, 0])
    assert lm._fast is not None  # the fast path really ran
    slow = _run(lm, False, ids, [2, 0])
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_fast_blocks_step_aside_where_equality_is_not_known():
    model, tok = make_tiny_model(num_layers=2, hidden=32)
    lm = LiteModel(model, tok)
    assert fast_blocks(lm.model, lm.blocks) is not None
    model.train()
    assert fast_blocks(lm.model, lm.blocks) is None  # dropout and training belong to the modules
    model.eval()
    handle = lm.blocks[1].register_forward_hook(lambda *a: None)
    assert fast_blocks(lm.model, lm.blocks) is None  # a hook must see its call
    handle.remove()
    original = lm.blocks[0].mlp.up_proj
    lm.blocks[0].mlp.up_proj = nn.Sequential(original)  # e.g. a LoRA or quantised wrapper
    assert fast_blocks(lm.model, lm.blocks) is None
    lm.blocks[0].mlp.up_proj = original
    model.config._attn_implementation = "eager"
    assert fast_blocks(lm.model, lm.blocks) is None
