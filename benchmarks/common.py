"""What the benchmark scripts share: their fixed prompts, the Vicuna questions read with lite's own loader.

Scripts run as ``python benchmarks/bench_x.py``, so this folder is on ``sys.path`` and they import it as
``common``. Without the shared data folder beside the repository, a short built-in list stands in.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VICUNA = REPO.parent / "shared" / "data" / "testsets" / "vicuna.jsonl"
FALLBACK_PROMPTS = [
    "Give three tips for staying healthy.", "What is the capital of France?", "Explain photosynthesis briefly.",
    "Write a haiku about the sea.", "How do I boil an egg?", "Name three primary colours.",
    "What does a compiler do?", "Describe a cat in one sentence.",
]


def vicuna_questions(first: int = 0, count: int = 8) -> list[str]:
    """Questions ``first .. first+count-1`` of the Vicuna test set (the first turn of each)."""
    if not VICUNA.is_file():
        return FALLBACK_PROMPTS[first:first + count]
    from lite.evaluation.testsets import read_testset

    return [p.instruction for p in read_testset("vicuna", VICUNA).prompts[first:first + count]]
