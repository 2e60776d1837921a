"""Forward compatibility: the adapter speaks the installed transformers, and devices are chosen generically."""

import warnings

import pytest
import torch
from torch import nn

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.errors import LiteError
from lite.model import cache_keyword
from lite.model.loading import default_device, parse_device, quiet_peft_internals


def _deprecations(caught: list[warnings.WarningMessage]) -> list[str]:
    """Deprecation warnings raised from transformers' or peft's code (whoever they blame)."""
    out = []
    for w in caught:
        if not issubclass(w.category, (FutureWarning, DeprecationWarning)):
            continue
        text = str(w.message)
        if any(part in w.filename for part in ("transformers", "peft")) or "deprecat" in text.lower():
            out.append(f"{w.category.__name__}: {text} ({w.filename}:{w.lineno})")
    return out


@pytest.mark.parametrize("kv", ["copy", "recompute"])
def test_lite_calls_of_decoder_blocks_raise_no_deprecation_warning(tiny_model_dir, kv):
    """Every block call lite makes (prefill, decode, K/V fill, recompute) with warnings fully on.

    The suite already turns transformers' FutureWarnings into errors; this test records *every* warning,
    whatever module it is attributed to, so that a deprecation blamed on lite's own frames fails too.
    """
    lm = load_model(tiny_model_dir, device="cpu")
    settings = GenerationSettings(max_new_tokens=6, kv=kv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(lm, [5, 17, 42, 99], ExitPolicy(kind="none"), settings)
        generate(lm, [5, 17, 42, 99], ExitPolicy(kind="static", layer=1), settings)
        with torch.no_grad():
            cache = lm.new_cache(8)
            h = lm.embed(torch.tensor([[1, 2, 3]]))
            lm.run_block(1, h, cache)
            lm.fill_kv(2, h, cache)
    assert _deprecations(caught) == []


def test_peft_adapter_load_raises_no_deprecation_warning(tiny_model_dir, tmp_path):
    """Loading a LoRA adapter (peft) through lite prints no deprecation warning."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with quiet_peft_internals():
        peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "adapter")
    import json

    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tiny_model_dir)
    cfg_path.write_text(json.dumps(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm = load_model(tmp_path / "adapter", device="cpu")
    assert lm.num_layers == 4
    assert _deprecations(caught) == []


def test_cache_keyword_follows_the_installed_block():
    class Old(nn.Module):
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False):
            return hidden_states

    class New(nn.Module):
        def forward(self, hidden_states, attention_mask=None, cache=None, use_cache=False):
            return hidden_states

    class Unknown(nn.Module):
        def forward(self, hidden_states, kv_store=None):
            return hidden_states

    assert cache_keyword(Old()) == "past_key_values"
    assert cache_keyword(New()) == "cache"
    with pytest.raises(TypeError, match="neither 'cache' nor 'past_key_values'"):
        cache_keyword(Unknown())


def test_the_installed_llama_block_takes_the_keyword_lite_chose(tiny_model_dir):
    """The choice made at wrap time is a real parameter of the installed block (not a deprecated alias)."""
    import inspect

    lm = load_model(tiny_model_dir, device="cpu")
    assert lm._cache_kw in inspect.signature(lm.blocks[0].forward).parameters


def test_default_device_is_what_torch_reports():
    expected = "cpu"
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        expected = torch.accelerator.current_accelerator().type
    assert default_device() == expected
    assert parse_device(None) == torch.device(expected)
    assert parse_device("auto") == torch.device(expected)
    assert parse_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu0", "cuda:x", "", "tpu:1"])
def test_a_bad_device_name_is_refused_naming_the_flag(bad):
    with pytest.raises(LiteError, match="--device"):
        parse_device(bad)


def test_an_absent_accelerator_is_refused_naming_what_torch_sees():
    missing = [t for t in ("cuda", "mps", "xpu") if not getattr(torch, t).is_available()]
    if not missing:
        pytest.skip("every accelerator type is present")
    with pytest.raises(LiteError, match=f"no {missing[0]} device"):
        parse_device(missing[0])


def test_load_model_refuses_a_bad_device_before_reading_anything(tmp_path):
    """The device is checked before the model argument: a missing folder is not even looked at."""
    with pytest.raises(LiteError, match="--device"):
        load_model(tmp_path / "does-not-exist", device="nonsense")


def test_load_model_puts_the_model_on_the_device_asked_for(tiny_model_dir):
    lm = load_model(tiny_model_dir, device="cpu")
    assert lm.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in lm.model.parameters())


def test_dtype_auto_is_bfloat16_only_where_the_hardware_runs_it(monkeypatch):
    from lite.model import loading

    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert loading.parse_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert loading.parse_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.parse_dtype(None) is None  # the library's default: the checkpoint's own dtype
    assert loading.parse_dtype("float16") == torch.float16
    with pytest.raises(LiteError, match="--dtype must be one of"):
        loading.parse_dtype("fp8")


@pytest.mark.parametrize("verb", ["generate", "eval", "serve", "demo", "calibrate", "train"])
def test_every_verb_spells_device_and_dtype_the_same(verb):
    from lite.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb").choices[verb]
    flags = {a.dest: a for a in sub._actions}
    assert flags["dtype"].choices == ("auto", "float32", "bfloat16", "float16")
    assert flags["device"].metavar == "DEVICE"
    expected = "float32" if verb in ("calibrate", "train") else "auto"
    assert flags["dtype"].default == expected
