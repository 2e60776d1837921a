"""The model adapter: exits, hidden states and decode primitives against transformers itself."""

import pytest
import torch

from lite import LiteConfig, default_exit_layers, load_model
from lite.model.config import LiteConfigError, parse_exit_layers


def test_default_exit_layers_match_spec():
    assert default_exit_layers(32) == [8, 12, 16, 20, 24, 28, 32]
    assert default_exit_layers(30) == [8, 11, 15, 19, 23, 26, 30]
    assert default_exit_layers(4) == [1, 2, 3, 4]
    assert default_exit_layers(1) == [1]


@pytest.mark.parametrize("text", ["0,4", "2,1,4", "1,2,5", "1,2", "a,b"])
def test_bad_exit_layers_name_the_flag(text):
    with pytest.raises(LiteConfigError, match="--exit-layers"):
        parse_exit_layers(text, 4)


def test_config_round_trip(tmp_path):
    cfg = LiteConfig.default_for(4, thresholds={"1": 0.9}, prompt_format="chat",
                                 provenance={"data_license": "MIT"})
    cfg.save(tmp_path)
    back = LiteConfig.load(tmp_path)
    assert back == cfg and back.threshold_for(1) == 0.9 and back.threshold_for(2) is None


def test_exit_logits_equal_transformers(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.no_grad():
        ref = lm.model(ids, output_hidden_states=True)
        states = lm.hidden_states(ids, layers=[1, 2, 3, 4])
        for k in (1, 2, 3):
            # raw block output from transformers, normed once, through the head
            direct = lm.model.lm_head(lm.model.model.norm(ref.hidden_states[k]))
            torch.testing.assert_close(lm.lm_head(states[k]), direct)
            torch.testing.assert_close(lm.exit_logits(ref.hidden_states[k], k), direct)
        # the final exit is exactly the model's own logits (norm applied once, not twice)
        torch.testing.assert_close(lm.lm_head(states[4]), ref.logits)


def test_block_by_block_prefill_and_decode_equal_transformers(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 11]])
    with torch.no_grad():
        ref = lm.model(ids).logits
        cache = lm.new_cache(16)
        # prefill 4 positions, then 1, then 2 (a multi-token step on a non-empty cache needs the mask)
        outs = []
        for a, b in [(0, 4), (4, 5), (5, 7)]:
            h = lm.embed(ids[:, a:b])
            for k in range(1, lm.num_layers + 1):
                h = lm.run_block(k, h, cache)
            outs.append(lm.exit_logits(h))
        torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=1e-4, atol=1e-4)
        assert cache.lengths == [[7]] * lm.num_layers


def test_fill_kv_equals_block_keys(tiny_model_dir):
    """fill_kv writes exactly the K/V that running the block on the same input would write."""
    lm = load_model(tiny_model_dir, device="cpu")
    with torch.no_grad():
        h = lm.embed(torch.tensor([[1, 2, 3]]))
        a, b = lm.new_cache(8), lm.new_cache(8)
        lm.run_block(2, h, a)
        lm.fill_kv(2, h, b)
        torch.testing.assert_close(a.keys[1][:, :, :3], b.keys[1][:, :, :3])
        torch.testing.assert_close(a.values[1][:, :, :3], b.values[1][:, :, :3])
        assert a.lengths == b.lengths == [[0], [3], [0], [0]]


def test_forward_exit_states_equal_hidden_states_without_logits(tiny_model_dir):
    """The training path (a forward of the causal LM with no logits) gives the same normed exit states."""
    lm = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    with torch.no_grad():
        ref = lm.hidden_states(ids, layers=[1, 3, 4])
        got = lm.forward_exit_states(ids, torch.ones_like(ids), layers=[1, 3, 4])
    assert sorted(got) == [1, 3, 4]
    for k in (1, 3, 4):
        torch.testing.assert_close(got[k], ref[k])


def test_write_atomic_text_bytes_and_failure(tmp_path):
    from lite.files import write_atomic

    target = tmp_path / "sub" / "f.md"
    write_atomic(target, "héllo\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert target.read_text(encoding="utf-8") == "héllo\n" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(AttributeError):  # not str or bytes: the write fails, the old file stays whole
        write_atomic(target, 42)
    assert target.read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.md"]  # no temporary left behind


@pytest.mark.parametrize("rows", [1, 3, 16, 17])
def test_head_logits_equal_the_head_module_for_every_row_count(tiny_model_dir, rows):
    lm = load_model(tiny_model_dir, device="cpu")
    normed = torch.randn(1, rows, lm.hidden_size)
    with torch.inference_mode():
        got, want = lm.head_logits(normed), lm.lm_head(normed)
        short = lm.vocab_head([5, 2, 9])(normed)
    assert got.shape == want.shape == (1, rows, lm.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short, want[..., [5, 2, 9]], rtol=1e-5, atol=1e-5)


def test_vocab_head_copies_rows_once_until_the_head_changes(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    first = lm.vocab_head([5, 2, 9])
    assert lm.vocab_head([5, 2, 9]) is first and lm.vocab_head([5, 2]) is not first
    normed = torch.randn(1, lm.hidden_size)
    before = lm.vocab_head([5, 2, 9])(normed)
    with torch.no_grad():
        lm.lm_head.weight.mul_(2.0)  # an in-place update (as an optimizer step makes)
    after = lm.vocab_head([5, 2, 9])(normed)
    torch.testing.assert_close(after, 2 * before)
