"""The one-call Python API (lite.load, LiteLM.generate) against the CLI on the same tiny model folder."""

import json
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import lite
from lite.cli import main
from lite.errors import LiteError
from lite.model.config import LiteConfig

README = Path(__file__).resolve().parent.parent / "README.md"
# exits that fire on the tiny random model (state cosine of consecutive exits), so exit layers vary
EXITS = {"exit": "dynamic", "thresholds": "1:0.8,2:0.8,3:0.8", "confidence": "state_cosine"}
EXIT_FLAGS = ["--exit", "dynamic", "--thresholds", "1:0.8,2:0.8,3:0.8", "--confidence", "state_cosine"]


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return lite.load(tiny_model_dir, dtype="float32", device="cpu")


def cli(model_dir, prompt, *flags):
    """``lite generate --json`` on the same folder: the one JSON object it prints."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["generate", "--model", str(model_dir), "--json", "--dtype", "float32", "--device", "cpu",
                     *flags, prompt])
    assert code == 0
    return json.loads(out.getvalue())


def same_as_cli(result, record):
    assert result.prompt_ids == record["prompt_ids"]
    assert result.token_ids == [t["id"] for t in record["tokens"]]
    assert result.exit_layers == [t["exit_layer"] for t in record["tokens"]]
    assert result.text == record["text"] and result.finish_reason == record["finish_reason"]
    assert result.layer_cost_improvement == pytest.approx(record["layer_cost_improvement"])
    assert result.cost.flops == record["flops"] and result.cost.head_evals == record["head_evals"]
    # batched, a block ridden along stands where lite generate (batch 1) filled K/V
    assert result.cost.kv_fills + result.cost.rode == record["kv_fills"]


@pytest.mark.parametrize("exits, flags", [({}, []), (EXITS, EXIT_FLAGS), ({"exit": "static:2"}, ["--exit", "static:2"])])
def test_a_string_prompt_gives_what_lite_generate_gives(lm, tiny_model_dir, exits, flags):
    result = lm.generate("name a colour", max_new_tokens=6, **exits)
    same_as_cli(result, cli(tiny_model_dir, "name a colour", "--max-new-tokens", "6", *flags))
    assert len(result.exit_layers) == 6 and all(1 <= k <= lm.num_layers for k in result.exit_layers)


def test_forced_exits_show_in_the_result_and_its_cost(lm):
    result = lm.generate("name a colour", max_new_tokens=6, **EXITS)
    assert min(result.exit_layers) < lm.num_layers  # some tokens left early ...
    assert result.layer_cost_improvement == pytest.approx(1 - sum(result.exit_layers) / (6 * lm.num_layers))
    assert result.cost.flops < result.cost.full_flops  # ... and the FLOPs record counts it


def test_a_conversation_is_formatted_by_the_chat_template(lm, tiny_model_dir):
    chat = [{"role": "user", "content": "name a colour"}]
    same_as_cli(lm.generate(chat, max_new_tokens=6, **EXITS),
                cli(tiny_model_dir, "name a colour", "--max-new-tokens", "6", *EXIT_FLAGS))
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "a colour?"}]
    text = lm.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert lm.generate(turns, max_new_tokens=2).prompt_ids == lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    alpaca = lm.encode(turns, prompt_format="alpaca")
    assert lm.tokenizer.decode(alpaca).endswith("### Instruction:\na colour?\n\n### Input:\nsystem: be brief\n\n"
                                                "user: hi\n\nassistant: hello\n\n### Response:\n")


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_a_list_of_prompts_gives_each_prompts_cli_answer_in_order(lm, tiny_model_dir, batch_size):
    prompts = ["name a colour", [{"role": "user", "content": "hello there"}], "count to three"]
    texts = ["name a colour", "hello there", "count to three"]
    results = lm.generate(prompts, max_new_tokens=5, batch_size=batch_size, **EXITS)
    assert isinstance(results, list) and len(results) == 3
    for result, text in zip(results, texts):
        same_as_cli(result, cli(tiny_model_dir, text, "--max-new-tokens", "5", *EXIT_FLAGS))


def test_streaming_yields_the_tokens_of_the_result(lm):
    whole = lm.generate("name a colour", max_new_tokens=6, **EXITS)
    records = list(lm.generate("name a colour", max_new_tokens=6, stream=True, **EXITS))
    assert [r.id for r in records] == whole.token_ids and "".join(r.text for r in records) == whole.text
    rows = list(lm.generate(["name a colour", "count to three"], max_new_tokens=4, batch_size=2, stream=True))
    alone = lm.generate(["name a colour", "count to three"], max_new_tokens=4, batch_size=1)
    for i in (0, 1):
        assert [r.id for row, r in rows if row == i] == alone[i].token_ids


def test_a_model_in_memory_gives_what_its_folder_gives(lm, tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    in_memory = lite.load(model, tokenizer)
    assert in_memory.model is model
    assert in_memory.generate("name a colour", max_new_tokens=6, **EXITS).token_ids == \
        lm.generate("name a colour", max_new_tokens=6, **EXITS).token_ids
    # a folder calibrated by lite brings its thresholds to the model loaded from it
    calibrated = tmp_path / "calibrated"
    shutil.copytree(tiny_model_dir, calibrated)
    LiteConfig.default_for(4, thresholds={"1": 0.8, "2": 0.8, "3": 0.8}, confidence="state_cosine",
                            prompt_format="chat").save(calibrated)
    wrapped = lite.load(AutoModelForCausalLM.from_pretrained(calibrated), tokenizer)
    assert wrapped.lite_model.lite_config.thresholds == {"1": 0.8, "2": 0.8, "3": 0.8}
    assert wrapped.generate("name a colour", max_new_tokens=6).exit_layers == \
        lm.generate("name a colour", max_new_tokens=6, **EXITS).exit_layers
    with pytest.raises(LiteError, match="tokenizer"):
        lite.load(model)
    assert lite.load(lm) is lm and lite.load(lm.lite_model).lite_model is lm.lite_model


@pytest.mark.parametrize("prompts, match", [
    ([1, 2], r"prompts\[0\]: a prompt is a string or a list of chat messages, got int"),
    ([["a"]], r"prompts\[0\]\[0\]: each message is a dict"),
    (None, "got NoneType"),
    ([], "got an empty list"),
    (["hi", {"role": "user", "content": "x"}], r"prompts\[1\] is a message dict among other prompts"),
    (["hi", "   "], r"prompts\[1\]: the prompt is empty"),
    ([{"role": "user"}], r"prompts\[0\]: each message is a dict with a string 'role' and a string 'content'"),
    ([{"role": "system", "content": "x"}], "no 'user' message"),
    (["hi", "hello " * 600], r"prompts\[1\]: the prompt is \d+ tokens but the model's context is 512"),
])
def test_bad_prompts_are_one_clear_error_before_decoding(lm, prompts, match):
    with pytest.raises(LiteError, match=match):
        lm.generate(prompts, max_new_tokens=2)


@pytest.mark.parametrize("kwargs, match", [
    ({"exit": "sometimes"}, "--exit"), ({"exit": "dynamic"}, "needs thresholds"),
    ({"max_new_tokens": 0}, "--max-new-tokens"), ({"kv": "keep"}, "--kv"), ({"batch_size": 0}, "batch_size"),
    ({"prompt_format": "markdown"}, "prompt_format"),
])
def test_bad_arguments_name_the_flag(lm, kwargs, match):
    with pytest.raises(LiteError, match=match):
        lm.generate(["hi", "there"], **kwargs)


def test_load_refuses_what_it_cannot_load(tmp_path):
    with pytest.raises(LiteError, match="no such folder"):
        lite.load(str(tmp_path / "missing"))
    with pytest.raises(LiteError, match="tokenizer= goes with a model already in memory"):
        lite.load("smollm2-135m-instruct", tokenizer=object())
    with pytest.raises(LiteError, match="got int"):
        lite.load(3)


def test_the_readme_python_example_runs(tiny_model_dir, tmp_path, capsys):
    """The README's code block, run as written on a calibrated copy of the tiny model in place of the shipped
    adapter (calibrated too, so the default exit is dynamic on both)."""
    section = README.read_text().split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert 'lite.load("smollm2-135m-lite")' in code
    model = tmp_path / "calibrated"
    shutil.copytree(tiny_model_dir, model)
    LiteConfig.default_for(4, thresholds={"1": 0.8, "2": 0.8, "3": 0.8}, confidence="state_cosine",
                            prompt_format="chat").save(model)
    namespace: dict = {}
    exec(compile(code.replace('"smollm2-135m-lite"', repr(str(model))), "README.md", "exec"), namespace)  # noqa: S102 (the README code)
    printed = capsys.readouterr().out
    out = namespace["out"]
    assert isinstance(out, lite.api.GenerationResult) and 1 <= len(out.exit_layers) <= 32
    assert all(t.confidence is not None for t in out.tokens)  # the calibrated thresholds decided (dynamic)
    assert str(out.exit_layers) in printed and "fewer FLOPs" in printed
    assert printed.count("length") + printed.count("stop") >= 2  # one line per prompt of the list
