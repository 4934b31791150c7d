"""`distilray bench tfree`: T-Free against BPE baselines of the same backbone (reference/tfree.md 7, 9).

- Models: `tfree` (hashed trigram words, v rows) and `bpe8k`, `bpe32k` (the project's BPE trained on the same
  corpus, embedding + softmax head), one backbone preset, the same documents packed the same way, the same
  steps and batch: equal training *steps*; each model's training time is reported beside its figures.
- Figures per model: fertility, duplicates, embedding + head parameters, the training worker's peak memory,
  sequence length relative to T-Free's, next-word top-1 accuracy and word perplexity on held-out text
  (pipelines/eval_tfree.py says how each is counted), training seconds.
- Goals (the issue's): T-Free fertility <= 1.2 with 0% duplicates; embedding + head >= 85% smaller than
  bpe32k's; T-Free next-word accuracy >= 0.9x the best BPE model's.
"""

from __future__ import annotations

import math
import time

from distilray.actors.cluster import ensure_ray
from distilray.config import BenchTFreeConfig, TrainTFreeConfig, config_from
from distilray.io_utils import atomic_write_json
from distilray.pipelines import eval_tfree, train_tfree

FERTILITY_GOAL = 1.2  # the paper's English figure is 1.16
PARAM_SAVING_GOAL = 0.85  # embedding + head at least 85% smaller than the 32k BPE model's
ACCURACY_RATIO_GOAL = 0.9  # T-Free next-word accuracy at least 0.9x the best BPE model's


def model_name(vocab_size: int) -> str:
    return f"bpe{vocab_size // 1024}k"


def train_all(cfg: BenchTFreeConfig) -> dict[str, dict]:
    common = dict(
        dataset=cfg.dataset,
        model=cfg.model,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        lr=cfg.lr,
        v=cfg.trigram.v,
        m=cfg.trigram.m,
        k=cfg.trigram.k,
        artifacts_dir=cfg.artifacts_dir,
        seed=cfg.seed,
    )
    runs = {}
    print(
        f"[bench tfree] tfree: {cfg.model}, {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} words ...", flush=True
    )
    runs["tfree"] = train_tfree.run(config_from(TrainTFreeConfig, **common))
    for size in cfg.bpe_vocab_sizes:
        name = model_name(size)
        print(f"[bench tfree] {name}: the same backbone and steps with a {size}-token BPE ...", flush=True)
        runs[name] = train_tfree.run(config_from(TrainTFreeConfig, **common, input="token", bpe_vocab_size=size))
    return runs


def run(cfg: BenchTFreeConfig) -> dict:
    started = time.perf_counter()
    ensure_ray()
    runs = train_all(cfg)
    source = cfg.eval_data or cfg.dataset
    texts = eval_tfree.held_out_texts(source, "test", cfg.eval_words)
    print("[bench tfree] evaluating ...", flush=True)
    models = {name: r["model_dir"] for name, r in runs.items()}
    tokenizers = {name: r["model_dir"] for name, r in runs.items() if name != "tfree"}
    figures = eval_tfree.evaluate(models, tokenizers, texts)
    keys = list(runs)
    result: dict = {
        key: {}
        for key in (
            "fertility",
            "duplicates",
            "embed_head_params",
            "peak_memory_mb",
            "sequence_length_ratio",
            "next_word_acc",
            "word_ppl",
            "train_seconds",
            "vocab_size",
        )
    }
    for name in keys:
        tok, model, res = figures[name]["tokenizer"], figures[name]["model"], runs[name]
        result["fertility"][name] = tok["fertility"]
        result["duplicates"][name] = tok["duplicates"]
        result["sequence_length_ratio"][name] = tok["sequence_length_ratio"]
        result["embed_head_params"][name] = model["embed_head_params"]
        result["next_word_acc"][name] = model["next_word_acc"]
        result["word_ppl"][name] = model["word_ppl"]
        result.setdefault("word_ppl_temperature", {})[name] = model["temperature"]
        result.setdefault("word_ppl_raw", {})[name] = model["word_ppl_raw"]
        result["peak_memory_mb"][name] = res.get("peak_rss_mb")
        # the optimizer steps alone, from the run's mean throughput: data preparation, the dictionary and the
        # final validation stay out, so the figure compares the models' training cost
        result["train_seconds"][name] = cfg.steps * cfg.batch_size * cfg.seq_len / res["tokens_per_s"]
        result["vocab_size"][name] = model["embed_head_params"] // (2 * model["d_model"])
    result["params"] = {name: figures[name]["model"]["params"] for name in keys}
    result["pattern_duplicates"] = figures["tfree"]["model"].get("pattern_duplicates")
    result["tfree_next_word_acc_by_score"] = figures["tfree"]["model"].get("next_word_acc_by_score")
    result["harness"] = {
        "held_out": f"{len(texts)} documents ({sum(len(eval_tfree.tfree_eval.reference_words(t)) for t in texts)} "
        f"reference words) of the test split of {source}",
        "budget": f"equal steps: {cfg.steps} of {cfg.batch_size} x {cfg.seq_len} positions, {cfg.model} backbone",
        "peak_memory_mb": "peak resident memory of the training worker process (Ray's own share included)",
        "trigram": {"v": cfg.trigram.v, "m": cfg.trigram.m, "k": cfg.trigram.k},
        "decode_score": "head (next-word pick); calibrated (word perplexity)",
    }
    result["runs"] = {name: r["model_dir"] for name, r in runs.items()}
    result["goals"] = compute_goals(result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["json"] = cfg.json_out
    if cfg.json_out:
        atomic_write_json(cfg.json_out, result)
    return result


def compute_goals(r: dict) -> dict:
    """The issue's goals with their figures: met True / False (None: nothing to judge)."""
    goals = {}
    fert, dup = r["fertility"]["tfree"], r["duplicates"]["tfree"]["total"]
    goals["tfree_fertility_and_duplicates"] = {
        "value": fert,
        "goal": f"fertility <= {FERTILITY_GOAL} (paper 1.16) and 0% duplicates (here {dup:.1f}%)",
        "met": fert <= FERTILITY_GOAL and dup == 0,
    }
    bpe = [n for n in r["embed_head_params"] if n != "tfree"]
    biggest = max(bpe, key=lambda n: r["embed_head_params"][n]) if bpe else None
    if biggest:
        saving = 1 - r["embed_head_params"]["tfree"] / r["embed_head_params"][biggest]
        goals["embed_head_saving"] = {
            "value": saving,
            "goal": f">= {PARAM_SAVING_GOAL:.0%} fewer embedding + head parameters than {biggest}",
            "met": saving >= PARAM_SAVING_GOAL,
        }
        best = max(bpe, key=lambda n: r["next_word_acc"][n] if math.isfinite(r["next_word_acc"][n]) else -1)
        ratio = r["next_word_acc"]["tfree"] / r["next_word_acc"][best] if r["next_word_acc"][best] else math.nan
        time_ratio = (r["train_seconds"]["tfree"] or math.nan) / (r["train_seconds"][best] or math.nan)
        goals["next_word_acc_vs_best_bpe"] = {
            "value": ratio,
            "goal": f">= {ACCURACY_RATIO_GOAL}x {best}'s at equal steps (T-Free's training time {time_ratio:.2f}x "
            f"{best}'s)",
            "met": bool(ratio >= ACCURACY_RATIO_GOAL) if math.isfinite(ratio) else None,
        }
    return goals


def _fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(r: dict) -> str:
    lines = [
        f"bench tfree: {r['harness']['budget']}; held out: {r['harness']['held_out']}",
        f"{'model':<8}{'vocab':>7}{'fertility':>10}{'dup %':>7}{'seq len':>8}{'emb+head':>10}{'params':>10}"
        f"{'peak MB':>9}{'acc':>7}{'word ppl':>11}{'train s':>9}",
    ]
    for name in r["fertility"]:
        lines.append(
            f"{name:<8}{r['vocab_size'][name]:>7}{_fmt(r['fertility'][name], '.3f'):>10}"
            f"{_fmt(r['duplicates'][name]['total'], '.1f'):>7}"
            f"{_fmt(r['sequence_length_ratio'][name], '.2f'):>8}{r['embed_head_params'][name]:>10,}"
            f"{r['params'][name]:>10,}{_fmt(r['peak_memory_mb'][name], '.0f'):>9}"
            f"{_fmt(r['next_word_acc'][name], '.3f'):>7}{_fmt(r['word_ppl'][name], '.5g'):>11}"
            f"{_fmt(r['train_seconds'][name], '.0f'):>9}"
        )
    lines.append(
        "vocab: embedding rows (T-Free: v hashed rows; BPE: what its training reached of the size asked); "
        "seq len: items relative to T-Free's on the same text; acc: next-word top-1 on letter words; word ppl: "
        "per reference word on the second half of the text after temperature scaling fitted on the first half "
        "(T-Free's over its dictionary + the held-out words: closed vocabulary)"
    )
    if r.get("tfree_next_word_acc_by_score"):
        by = ", ".join(f"{k} {v:.3f}" for k, v in r["tfree_next_word_acc_by_score"].items())
        lines.append(f"T-Free next-word acc by decode score: {by} (the goal uses head, the default)")
    if r.get("word_ppl_temperature"):
        temps = ", ".join(f"{k} {v:g}" for k, v in r["word_ppl_temperature"].items())
        raw = ", ".join(f"{k} {_fmt(v, '.4g')}" for k, v in r["word_ppl_raw"].items())
        lines.append(f"word ppl temperatures: {temps}; at temperature 1: {raw}")
    if r.get("pattern_duplicates"):
        lines.append(f"T-Free dictionary words sharing a pattern (hash collisions): {r['pattern_duplicates']}")
    lines.append("goals:")
    for name, g in r["goals"].items():
        mark = "reported" if g["met"] is None else ("met" if g["met"] else "NOT met")
        lines.append(f"  {name}: {_fmt(g['value'], '.3f')}; goal {g['goal']}: {mark}")
    if r.get("json"):
        lines.append(f"JSON: {r['json']}")
    return "\n".join(lines)
