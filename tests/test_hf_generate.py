"""lite's loop inside transformers' model.generate (custom_generate): with exits off it is generate itself,
token for token; with exits on it is lite.generate, with the exit record beside the ids."""

import pytest
import torch
from tiny import make_tiny_model

import lite
from lite.decoding.hf_generate import LiteGenerateOutput
from lite.errors import LiteError

EXITS = {"exit": "dynamic", "thresholds": "1:0.8,2:0.8,3:0.8", "confidence": "state_cosine"}
PROMPTS = ["hello there the world", "hi", "name three colours please"]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return make_tiny_model()


def batch(tok, prompts, side="left"):
    return tok(prompts, return_tensors="pt", padding=True, padding_side=side)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS])
def test_exits_off_it_is_generate_token_for_token(model_and_tokenizer, prompts):
    model, tok = model_and_tokenizer
    inputs = batch(tok, prompts)
    plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    ours = model.generate(**inputs, max_new_tokens=12, do_sample=False, custom_generate=lite.custom_generate,
                          exit="none")
    assert ours.shape == plain.shape and torch.equal(ours, plain)


def test_rows_ending_at_eos_are_padded_as_generate_pads_them(model_and_tokenizer):
    model, tok = model_and_tokenizer
    inputs = batch(tok, PROMPTS)
    free = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    width = inputs["input_ids"].shape[1]
    eos = int(free[1, width + 2])  # a token row 1 produces third: it now ends there, the others go on
    plain = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    ours = model.generate(**inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
                          custom_generate=lite.custom_generate, exit="none")
    assert torch.equal(ours, plain)
    assert (ours[1, width + 3:] == 0).all() and ours.shape[1] <= free.shape[1]


def test_right_padding_gives_the_same_new_tokens(model_and_tokenizer):
    model, tok = model_and_tokenizer
    left = model.generate(**batch(tok, PROMPTS), max_new_tokens=6, custom_generate=lite.custom_generate, exit="none")
    right = model.generate(**batch(tok, PROMPTS, "right"), max_new_tokens=6, custom_generate=lite.custom_generate,
                           exit="none")
    assert torch.equal(left[:, -6:], right[:, -6:])


def test_exits_on_it_is_lite_generate_with_the_exit_record(tiny_model_dir):
    lm = lite.load(tiny_model_dir, dtype="float32", device="cpu")
    prompts = ["name a colour", "count to three"]
    alone = lm.generate(prompts, max_new_tokens=8, batch_size=1, **EXITS)
    ids = [lm.encode(p) for p in prompts]
    inputs = lm.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding_side="left")
    record: list = []
    out = lm.model.generate(**inputs, max_new_tokens=8, custom_generate=lm.custom_generate,
                            return_dict_in_generate=True, exit_record=record, **EXITS)
    assert isinstance(out, LiteGenerateOutput) and out.scores is None
    width = inputs["input_ids"].shape[1]
    for row, result in enumerate(alone):
        assert out.sequences[row, width:width + len(result.token_ids)].tolist() == result.token_ids
        assert out.exit_layers[row] == result.exit_layers
        got = record[row].cost  # batched: a block ridden along stands where batch 1 filled K/V
        assert record[row].token_ids == result.token_ids and got.flops == result.cost.flops
        assert got.kv_fills + got.rode == result.cost.kv_fills
    assert min(min(layers) for layers in out.exit_layers) < lm.num_layers  # exits did happen
    # the module-level callable reads the folder's tokenizer, so the record has the text too
    plain_record: list = []
    lm.model.generate(**inputs, max_new_tokens=8, custom_generate=lite.custom_generate, exit_record=plain_record,
                      **EXITS)
    assert [r.text for r in plain_record] == [r.text for r in alone]


def test_sampling_uses_temperature_and_top_p_and_the_torch_seed(model_and_tokenizer):
    model, tok = model_and_tokenizer
    inputs = batch(tok, PROMPTS[:1])
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(**inputs, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95,
                                   top_k=0, custom_generate=lite.custom_generate, exit="none"))
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(**inputs, max_new_tokens=10, custom_generate=lite.custom_generate, exit="none")
    assert not torch.equal(runs[0], greedy)  # it did sample


@pytest.mark.parametrize("kwargs, match", [
    ({"num_beams": 2}, "beam search"),
    ({"do_sample": True}, "top_k=0"),
    ({"repetition_penalty": 1.3}, "RepetitionPenaltyLogitsProcessor"),
    ({"min_new_tokens": 3}, "MinNewTokensLengthLogitsProcessor|MinLengthLogitsProcessor"),
    ({"max_time": 5.0}, "MaxTimeCriteria"),
    ({"return_dict_in_generate": True, "output_scores": True}, "scores"),
    ({"exit": "static:9"}, "out of range"),
    ({"exit": "dynamic"}, "needs thresholds"),
])
def test_what_the_loop_cannot_honour_is_refused_by_name(model_and_tokenizer, kwargs, match):
    model, tok = model_and_tokenizer
    with pytest.raises(LiteError, match=match):
        model.generate(**batch(tok, PROMPTS[:1]), max_new_tokens=4, custom_generate=lite.custom_generate, **kwargs)


def test_a_lite_models_loop_runs_only_on_its_own_model(tiny_model_dir, model_and_tokenizer):
    lm = lite.load(tiny_model_dir, dtype="float32", device="cpu")
    other, tok = model_and_tokenizer
    with pytest.raises(LiteError, match="its own model"):
        other.generate(**batch(tok, PROMPTS[:1]), max_new_tokens=4, custom_generate=lm.custom_generate)
