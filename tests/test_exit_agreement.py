"""benchmarks/exit_agreement.py on a tiny exit-module run: models over one frozen backbone share their greedy
answers, models with weights of their own never do, and the figures are those of answers decoded one by one.
The script runs as users run it, in its own process (tests import no benchmark)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lite import LiteConfig, load_model
from lite.decoding import ExitPolicy, GenerationSettings, generate
from lite.model.prompts import default_format, encode_prompt
from lite.training import train
from lite.training.data import load_heldout

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # child processes

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


def test_answers_are_shared_by_one_backbone_only_and_equal_to_one_by_one(module_run, tiny_model_dir, tmp_path):
    full = tmp_path / "full"  # a lite folder whose backbone was trained (no modules): never shared
    shutil.copytree(tiny_model_dir, full)
    LiteConfig(num_layers=4, exit_layers=[2, 4], base_model=str(tiny_model_dir)).save(full)
    own = tmp_path / "own"  # exit modules beside a full model of its own: its answers are its own
    shutil.copytree(module_run, own)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, own / name)
    out = tmp_path / "agree.md"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    models = [module_run, tiny_model_dir, full, own]
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "exit_agreement.py"),
                          *[a for m in models for a in ("--model", str(m))], "--heldout-from", str(module_run),
                          "--limit", "5", "--max-new-tokens", "6", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.with_suffix(".json").read_text())["models"]
    shared = {m: res[str(m)]["answers_shared_by_backbone"] for m in models}
    # the plain model reuses the answers of the modules over it; the full fine-tune and a folder with a model
    # of its own answer for themselves
    assert shared == {module_run: False, tiny_model_dir: True, full: False, own: False}
    first, base = res[str(module_run)], res[str(tiny_model_dir)]
    assert first["layers"]["4"]["agreement"] == 1.0  # layer L agrees with itself
    # the batched answers are the ones each prompt gets alone
    lm = load_model(module_run, device="cpu")
    alone = [generate(lm, encode_prompt(lm.tokenizer, row.instruction, row.input, default_format(lm)),
                      ExitPolicy(kind="none"), GenerationSettings(max_new_tokens=6)).token_ids
             for row in load_heldout(lm.lite_config)[:5]]
    assert first["answer_tokens"] == base["answer_tokens"] == sum(len(a) for a in alone) > 0
