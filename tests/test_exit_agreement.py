"""benchmarks/exit_agreement.py on a tiny exit-module run: the greedy answers are decoded in batches and
shared by the models over one frozen backbone, and the figures are those of answers decoded one by one."""

import json
import sys
from pathlib import Path

import pytest

from lite import load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.training import train
from lite.training.data import load_heldout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import exit_agreement  # noqa: E402

ROWS = [{"instruction": f"Say something about {w}.", "input": "", "output": f"{w} is nice."}
        for w in ("cats", "rain", "tea", "maps", "snow", "bees", "jazz", "salt", "moss", "kites")] * 2


@pytest.fixture(scope="module")
def module_run(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("agree")
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(dict(r, instruction=f"{r['instruction']} {i}")) + "\n"
                            for i, r in enumerate(ROWS)))
    return train(str(tiny_model_dir), str(data), folder / "run", max_steps=2, lr=1e-2, batch_size=4,
                 exit_layers="2,4", own_answer_tokens=4, heldout_fraction=0.25, show_progress_bar=False).output_dir


def test_answers_are_batched_shared_by_the_backbone_and_equal_to_one_by_one(module_run, tiny_model_dir, tmp_path):
    out = tmp_path / "agree.md"
    assert exit_agreement.main(["--model", str(module_run), "--model", str(tiny_model_dir), "--heldout-from",
                                str(module_run), "--limit", "5", "--max-new-tokens", "6", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    first, base = res["models"][str(module_run)], res["models"][str(tiny_model_dir)]
    assert first["answers_shared_by_backbone"] is False and base["answers_shared_by_backbone"] is True
    assert first["answer_tokens"] == base["answer_tokens"] > 0  # the same answers
    assert first["layers"]["4"]["agreement"] == 1.0  # layer L agrees with itself
    # the batched answers are the ones each prompt gets alone
    lm = load_model(module_run, device="cpu")
    rows = load_heldout(lm.lite_config)[:5]
    batched = exit_agreement.own_answers(lm, rows, 6, batch_size=4)
    for prompt, answer in batched:
        alone = generate(lm, prompt, ExitPolicy(kind="none"), GenerationSettings(max_new_tokens=6)).token_ids
        assert answer == list(alone)
    # and the figures are those of the answers given one by one
    stats = exit_agreement.own_answer_stats(lm, rows, [2, 4], 6, answered=batched)
    single = exit_agreement.own_answer_stats(lm, rows, [2, 4], 6,
                                             answered=exit_agreement.own_answers(lm, rows, 6, batch_size=1))
    assert stats["agree"] == single["agree"] and stats["counts"] == single["counts"]
    assert sum(stats["counts"]) == first["answer_tokens"]


def test_lora_and_full_models_never_share_answers(module_run, tiny_model_dir, tmp_path):
    import shutil

    from lite import LiteConfig

    lm = load_model(tiny_model_dir, device="cpu")
    plain = exit_agreement.backbone_key(str(tiny_model_dir), lm)
    assert plain is not None and plain == exit_agreement.backbone_key(str(module_run), lm)  # modules over it
    full = tmp_path / "full"  # a lite folder whose backbone was trained (no modules): never shared
    shutil.copytree(tiny_model_dir, full)
    LiteConfig(num_layers=4, exit_layers=[2, 4], base_model=str(tiny_model_dir)).save(full)
    assert exit_agreement.backbone_key(str(full), lm) is None


def test_a_folder_with_modules_and_weights_of_its_own_gets_no_shared_answers(module_run, tiny_model_dir, tmp_path):
    import shutil

    lm = load_model(tiny_model_dir, device="cpu")
    own = tmp_path / "own"  # exit modules beside a full model of its own: its answers are its own
    shutil.copytree(module_run, own)
    shutil.copy(tiny_model_dir / "config.json", own / "config.json")
    assert exit_agreement.backbone_key(str(own), lm) is None
