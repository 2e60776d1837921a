"""Final-layer answers of the evaluated model vs the compare model, from a `lite eval` records.jsonl.

`lite eval --compare-model` decodes both models' full answers on the same prompts; this scores them
against the test sets' reference outputs (where a set has them: Self-Instruct) and against each other
(ROUGE-L and MiniLM similarity), to answer "does LITE hurt the last layer?" on generated text.

Usage: python benchmarks/final_layer_compare.py RECORDS.jsonl OUT.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from lite.evaluation.metrics import MiniLMEmbedder, cosine_similarities, rouge_l
from lite.files import write_atomic


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv: list[str]) -> int:
    records, out = Path(argv[0]), Path(argv[1])
    rows = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    by_key = defaultdict(dict)
    for r in rows:
        by_key[(r["testset"], r["id"])][r["role"]] = r
    pairs = [(k, v["main"], v["compare"]) for k, v in by_key.items() if "main" in v and "compare" in v]
    embedder = MiniLMEmbedder()
    lines = [f"# Final-layer answers: evaluated (LITE) vs compare (baseline) model, from `{records.name}`", "",
             "Greedy full-model answers of both models on the same prompts. Produced by "
             "`benchmarks/final_layer_compare.py`.", "",
             "| set | n | ROUGE-L LITE vs baseline answer | similarity LITE vs baseline answer | "
             "ROUGE-L vs reference: baseline / LITE | similarity vs reference: baseline / LITE | tokens baseline / LITE |",
             "|---|---|---|---|---|---|---|"]
    sets = sorted({k[0] for k, _, _ in pairs}, key=lambda s: [k[0] for k, _, _ in pairs].index(s))
    for name in sets + ["overall"]:
        sel = [(m, c) for k, m, c in pairs if name == "overall" or k[0] == name]
        lite_text = [m["full"]["text"].strip() for m, _ in sel]
        base_text = [c["full"]["text"].strip() for _, c in sel]
        sims = cosine_similarities(embedder, lite_text, base_text)
        rouge = [rouge_l(a, b) for a, b in zip(lite_text, base_text)]
        refs = [(m, c) for m, c in sel if m.get("reference")]
        if refs:
            ref_text = [m["reference"] for m, _ in refs]
            lt = [m["full"]["text"].strip() for m, _ in refs]
            bt = [c["full"]["text"].strip() for _, c in refs]
            ref_r = f"{mean([rouge_l(b, r) for b, r in zip(bt, ref_text)]):.3f} / " \
                    f"{mean([rouge_l(a, r) for a, r in zip(lt, ref_text)]):.3f}"
            ref_s = f"{mean(cosine_similarities(embedder, bt, ref_text)):.3f} / " \
                    f"{mean(cosine_similarities(embedder, lt, ref_text)):.3f}"
        else:
            ref_r = ref_s = "-"
        tokens = f"{mean([len(c['full']['token_ids']) for _, c in sel]):.1f} / " \
                 f"{mean([len(m['full']['token_ids']) for m, _ in sel]):.1f}"
        lines.append(f"| {name} | {len(sel)} | {mean(rouge):.3f} | {mean(sims):.3f} | {ref_r} | {ref_s} | {tokens} |")
    write_atomic(out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
