"""Model cards: the ``README.md`` of a checkpoint folder, saying what the checkpoint is.

Written from what the folder itself records (``lite_config.json``: exits, loss weights, recipe, data,
thresholds and calibration figures, provenance; ``adapter_config.json``; ``trainer_log.json``: the last
logged per-exit losses), so it is rewritten whenever lite changes the folder (``lite train`` writes it,
``lite calibrate`` refreshes it) and never disagrees with the files beside it. A README that lite did not
write is kept, unless it is peft's empty template.

Layer numbering: layer k = output of decoder block k, 1-indexed; L = number of decoder layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..files import write_atomic
from .config import CONFIG_NAME, LiteConfig, quality_measure_label
from .loading import hub_id_for

CARD_NAME = "README.md"
MARK = "<!-- model card written by lite from lite_config.json; lite rewrites it when it changes the folder -->"
# what lite knows of the licences of base models it names (the embedded default's hub id)
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
_PEFT_TEMPLATE = "[More Information Needed]"  # every section of peft's empty card says this


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _front_matter_license(folder: Path) -> str | None:
    """The ``license:`` of a local model folder's own card, if it has one."""
    card = folder / CARD_NAME
    try:
        text = card.read_text(encoding="utf-8")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    for line in text.split("---", 2)[1].splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip()
    return None


def base_license(base: str | None) -> str | None:
    """The licence of a base model named by hub id (when lite knows it) or by a local folder (its card's)."""
    if not base:
        return None
    if base in KNOWN_LICENSES:
        return KNOWN_LICENSES[base]
    path = Path(base)
    return _front_matter_license(path) if path.is_dir() else None


def _last_losses(folder: Path) -> dict[str, float]:
    """The last logged figure per exit (``loss_l<k>``, or ``kl_l<k>`` for self-distillation)."""
    try:
        history = json.loads((folder / "trainer_log.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    for entry in reversed(history if isinstance(history, list) else []):
        figures = {k: v for k, v in entry.items() if k.startswith(("loss_l", "kl_l"))}
        if figures:
            return figures
    return {}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def model_card(folder: str | Path, base_id: str | None = None, name: str | None = None) -> str:
    """The card of the checkpoint in ``folder`` (see the module docstring).

    Args:
        base_id: the base model as Hugging Face tools name it (hub id or path); default: the adapter's
            ``base_model_name_or_path``, else ``lite_config.json``'s ``base_model``.
        name: the checkpoint's name in the title and the examples (default: the folder's name).
    """
    folder = Path(folder)
    cfg = LiteConfig.load(folder) or LiteConfig.default_for(1)
    adapter = _read_json(folder / "adapter_config.json")
    base = base_id or adapter.get("base_model_name_or_path") or (hub_id_for(cfg.base_model) if cfg.base_model else None)
    kind = ("exit modules" if cfg.exit_modules else "LoRA adapter" if adapter else "full model")
    license_ = base_license(base)
    t = cfg.training or {}
    tags = ["lite", "early-exit", "text-generation"] + (["lora"] if adapter else [])
    lines = ["---"]
    if base:
        lines.append(f"base_model: {base}")
    lines.append(f"library_name: {'peft' if adapter else 'transformers'}")
    if license_:
        lines.append(f"license: {license_}")
    lines += ["pipeline_tag: text-generation", "tags:", *[f"- {tag}" for tag in tags], "---", "", MARK, ""]
    name = name or folder.name
    what = {"LoRA adapter": f"A LoRA adapter (rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, on "
                            f"{', '.join(sorted(adapter.get('target_modules') or [])) or 'the default modules'}) "
                            f"of `{base}`",
            "full model": f"A full fine-tune of `{base}`" if base else "A model",
            "exit modules": f"Trained `{cfg.exit_modules}` exit modules (`exit_modules.safetensors`) over the frozen "
                            f"backbone `{base}`, which is unchanged"}[kind]
    baseline = bool(t.get("baseline"))
    lines += [f"# {name}", "",
              f"{what}, made with `lite`, the LITE method (Varshney et al., NAACL Findings 2024, "
              f"[arXiv:2310.18581](https://arxiv.org/abs/2310.18581): losses from intermediate layers, then "
              f"token-level early exit). "
              + ("Baseline run: only the final layer's loss (standard instruction tuning)." if baseline else
                 "Its intermediate layers are trained to emit tokens through the model's own final norm and head."),
              "", "## Exits", "",
              (f"- {cfg.num_layers} decoder layers; exit layers {cfg.exit_layers} (layer k = output of decoder "
              f"block k; {cfg.num_layers} is the full model).")]
    if cfg.loss_weights and any(cfg.loss_weights):
        weights = ", ".join(f"{k}: {w:.3f}" for k, w in zip(cfg.exit_layers, cfg.loss_weights))
        lines.append(f"- Loss weights ({cfg.loss_weighting}): {weights}.")
    lines.append(f"- Prompt format: {cfg.prompt_format}.")
    if cfg.thresholds:
        thresholds = ", ".join(f"{k}: {float(v):.3f}" for k, v in sorted(cfg.thresholds.items(), key=lambda kv: int(kv[0])))
        lines.append(f"- Calibrated {cfg.confidence} thresholds: {thresholds}.")
    else:
        lines.append("- Not calibrated yet: `lite calibrate --model <this folder>` sets exit thresholds.")
    if cfg.gate_file:
        lines.append(f"- Learned exit gate: `{cfg.gate_file}` (`--exit gate`).")
    if cfg.exit_vocab:
        lines.append(f"- Exit vocabulary: exits below layer {cfg.num_layers} read the head over the {cfg.exit_vocab} most "
                     f"frequent tokens of `draft_vocab.json` (`--exit-vocab`).")
    if cfg.default_exit:
        costs = (cfg.calibration or {}).get("expected_compute") or {}
        priced = ", ".join(f"{k} {float(v):.2f}" for k, v in costs.items())
        lines.append(f"- Default exit policy (`--exit auto`): {cfg.default_exit}"
                     + (f"; expected compute per step on the calibration tokens, against the full model's: {priced}"
                        if priced else "") + ".")
        chosen = cfg.quality_choice()
        if chosen is not None:  # --quality-bar: what the decoded answers kept
            quality = cfg.calibration["quality"]
            ratios = [f"{label} {chosen[key]:.3f}" for label, key in (("ROUGE-L vs references", "rouge_ratio"),
                      ("the full model's likelihood", "loglik_ratio")) if chosen.get(key) is not None]
            lines.append(
                f"- Chosen by the quality bar {quality['bar']} ({quality_measure_label(quality['measure'])}) on "
                f"{quality['full']['prompts']} decoded calibration prompts: {chosen['name']} kept "
                f"{chosen['quality']:.3f} of the full model's quality" + (f" ({', '.join(ratios)})" if ratios else "")
                + f" at {100 * chosen['layers_saved']:.1f}% of layers and {100 * chosen['compute_saved']:.1f}% of "
                f"FLOPs saved.")
        priced_by_batch = ((cfg.calibration or {}).get("priced_speedup") or {}).get(cfg.default_exit)
        auto = (cfg.calibration or {}).get("auto_by_batch") or {}
        if priced_by_batch and "price_margin" in cfg.calibration:
            off = [b for b, policy in auto.items() if policy == "none"]
            lines.append(
                "- Rows decoded together wait for the deepest: the step of a batch priced against the full "
                "model's (faster above 1): " + ", ".join(f"{v:.2f}x at batch {b}" for b, v in priced_by_batch.items())
                + (f". `--exit auto` decodes in full at batch {', '.join(off)} (exits are kept where they price "
                   f"at least {cfg.calibration['price_margin']:.0%} faster; batch-invariant serving "
                   f"prices every row alone)." if off else "."))
    if t:
        lines += ["", "## Recipe", ""]
        keys = ("steps", "max_steps", "epochs", "lr", "lr_schedule", "batch_size", "grad_accum", "world_size",
                "max_length", "targets", "ce_weight", "responses", "lora_rank", "lora_alpha", "bf16", "seed")
        lines.append("| setting | value |")
        lines.append("|---|---|")
        lines += [f"| {k} | {_fmt(t[k])} |" for k in keys if t.get(k) is not None]
    data = cfg.data or {}
    if data.get("sources"):
        lines += ["", "## Data", ""]
        for s in data["sources"]:
            where = s.get("path") or s.get("hub_dataset")
            lines.append(f"- `{where}`: {s.get('rows_kept', '?')} of {s.get('rows', '?')} rows kept"
                         + (f" (sha256 {s['sha256'][:12]}...)" if s.get("sha256") else ""))
        if data.get("filter"):
            lines.append(f"- Filter: {data['filter']}.")
        if data.get("heldout_from"):
            lines.append(f"- {data.get('rows_train', '?')} training rows; {len(data.get('heldout_ids', []))} held out "
                         f"for calibration, the rows `{data['heldout_from']}` held out.")
        elif data.get("heldout_fraction") is not None:
            lines.append(f"- {data.get('rows_train', '?')} training rows; {data['heldout_fraction']:.0%} held out "
                         f"(seed {data.get('heldout_seed')}) for calibration.")
    figures = _last_losses(folder)
    calibration = cfg.calibration or {}
    if figures or calibration.get("agreement"):
        lines += ["", "## Figures", ""]
        if figures:
            lines.append("Last logged training figure per exit: "
                         + ", ".join(f"{k.replace('_l', ' at layer ')} {v:.3f}" for k, v in
                                     sorted(figures.items(), key=lambda kv: int(kv[0].rsplit("_l", 1)[1]))) + ".")
        if calibration.get("agreement"):
            agreement = ", ".join(f"{k}: {v:.0%}" for k, v in calibration["agreement"].items())
            lines.append(f"Agreement of each exit's argmax with the final layer's on held-out tokens: {agreement}.")
            rates = calibration.get("expected_exit_rate") or {}
            if rates:
                lines.append("Expected share of tokens leaving at each exit: "
                             + ", ".join(f"{k}: {v:.0%}" for k, v in rates.items()) + ".")
    lines += ["", "## Licences", "",
              f"- Base model: {license_ or 'not recorded by lite; see the base model card'}.",
              "- Data: " + (str(cfg.provenance.get("data")) if cfg.provenance.get("data") else
                            "not recorded by lite; the training data's own terms apply") + "."]
    for key, value in cfg.provenance.items():
        if key not in ("data", "own_answers"):
            lines.append(f"- {key.replace('_', ' ')}: {value}")
    lines += ["", "## Use", "", "```bash", f"lite generate --model {name} \"Name three primary colours.\"", "```",
              "", "```python", "import lite", "", f"lm = lite.load(\"{name}\")",
              "print(lm.generate(\"Name three primary colours.\").text)"]
    if adapter:
        lines += ["", "# or with peft alone (no early exit)", "from peft import AutoPeftModelForCausalLM", "",
                  f"model = AutoPeftModelForCausalLM.from_pretrained(\"{name}\")"]
    elif not cfg.exit_modules:
        lines += ["", "# or with transformers alone (no early exit)",
                  "from transformers import AutoModelForCausalLM", "",
                  f"model = AutoModelForCausalLM.from_pretrained(\"{name}\")"]
    lines += ["```", ""]
    return "\n".join(lines)


def is_ours_or_template(card: Path) -> bool:
    """True when ``card`` is absent, written by lite, or peft's empty template: lite may (re)write it."""
    try:
        text = card.read_text(encoding="utf-8")
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return MARK in text or _PEFT_TEMPLATE in text


def write_model_card(folder: str | Path, base_id: str | None = None, name: str | None = None) -> Path | None:
    """Write ``README.md`` into ``folder`` (see :func:`model_card`); returns its path, or None when the folder
    holds a README that lite did not write (kept as is) or no ``lite_config.json``."""
    folder = Path(folder)
    card = folder / CARD_NAME
    if not (folder / CONFIG_NAME).is_file() or not is_ours_or_template(card):
        return None
    write_atomic(card, model_card(folder, base_id, name))
    return card
