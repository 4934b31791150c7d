"""The figures of `distilray bench sdtt` judged and printed: the paper's claims at this scale (met / not met,
with the numbers), the divergence ranking, the grid ablation, and the table the command prints."""

from __future__ import annotations

import math
from pathlib import Path

ENTROPY_TOLERANCE = 0.02  # relative: a student "keeps quality" only with entropy within 2% of the teacher's
GOALS = {"speedup_vs_teacher_full_steps": 6.0, "entropy_within": ENTROPY_TOLERANCE}


# ----------------------------------------------------------------------------------------- goals
def _row(rows: list[dict], model: str, steps: int) -> dict | None:
    return next((r for r in rows if r["model"] == model and r["steps"] == steps), None)


def _rel(a: float, b: float) -> float:
    return a / b - 1.0 if b else math.nan


def keeps_quality(student: dict, teacher: dict) -> bool:
    """Gen PPL no higher than the teacher's at the same steps, with entropy within ENTROPY_TOLERANCE of it."""
    return student["gen_ppl"] <= teacher["gen_ppl"] and abs(_rel(student["entropy"], teacher["entropy"])) <= (
        ENTROPY_TOLERANCE
    )


def compute_goals(r: dict) -> dict:
    """The paper's claims at this scale, from `rows` (and `speed`): each with its figures; met True/False, or
    None where the figure is reported without a pass mark."""
    rows, s = r["rows"], r["settings"]
    full, rounds = s["full_steps"], s["rounds"]
    final, eighth, sixteenth = f"student-kld-r{rounds}", max(1, full // 8), max(1, full // 16)
    goals: dict = {}
    st, te = _row(rows, final, eighth), _row(rows, "teacher", eighth)
    if st and te:
        goals["kld_final.gen_ppl_at_1/8"] = {
            "steps": eighth,
            "value": st["gen_ppl"],
            "teacher": te["gen_ppl"],
            "goal": "<= teacher",
            "met": st["gen_ppl"] <= te["gen_ppl"],
        }
        gap = _rel(st["entropy"], te["entropy"])
        goals["kld_final.entropy_at_1/8"] = {
            "steps": eighth,
            "value": st["entropy"],
            "teacher": te["entropy"],
            "relative_gap": gap,
            "goal": f"within {ENTROPY_TOLERANCE:.0%}",
            "met": abs(gap) <= ENTROPY_TOLERANCE,
        }
    st16, te16 = _row(rows, final, sixteenth), _row(rows, "teacher", sixteenth)
    if st16 and te16:
        goals["kld_final.at_1/16"] = {
            "steps": sixteenth,
            "value": st16["gen_ppl"],
            "teacher": te16["gen_ppl"],
            "entropy": st16["entropy"],
            "teacher_entropy": te16["entropy"],
            "goal": "reported",
            "met": None,
        }
    if r.get("speed"):
        sp = r["speed"]
        goals["kld_final.speedup_vs_teacher_full_steps"] = {
            "value": sp["speedup"],
            "steps": f"{sp['teacher_steps']} vs {sp['student_steps']}",
            "goal": f">= {GOALS['speedup_vs_teacher_full_steps']:g}x",
            "met": sp["speedup"] >= GOALS["speedup_vs_teacher_full_steps"],
        }
    goals["divergences.reverse_kl_only_one_kept_quality"] = _divergence_claim(rows, s)
    if s.get("grid_ablation"):
        goals["grid.corrected_vs_original"] = _grid_ablation(rows, full, rounds)
    return goals


def _divergence_claim(rows: list[dict], s: dict) -> dict:
    full, rounds = s["full_steps"], s["rounds"]
    last = max(1, full // 2**rounds)
    ranking, kept, per_round = [], {}, {}
    for d in s["divergences"]:
        fin = _row(rows, f"student-{d}-r{rounds}", last)
        if fin:
            ranking.append({"divergence": d, "gen_ppl": fin["gen_ppl"], "entropy": fin["entropy"]})
        checks = []
        for k in range(1, rounds + 1):
            own = max(1, full // 2**k)
            st, te = _row(rows, f"student-{d}-r{k}", own), _row(rows, "teacher", own)
            if st and te:
                checks.append(keeps_quality(st, te))
                per_round.setdefault(d, []).append(
                    {"round": k, "steps": own, "gen_ppl_vs_teacher": _rel(st["gen_ppl"], te["gen_ppl"])}
                    | {"entropy_vs_teacher": _rel(st["entropy"], te["entropy"])}
                )
        kept[d] = bool(checks) and all(checks)
    ranking.sort(key=lambda x: x["gen_ppl"])
    others = [d for d in kept if d != "kld" and kept[d]]
    if not kept.get("kld"):
        verdict = "refuted: reverse KL (kld) did not keep quality"
    elif others:
        verdict = f"refuted: {', '.join(others)} kept quality too"
    else:
        verdict = "confirmed"
    if not kept.get("kld") and others:
        verdict += f"; {', '.join(others)} did"
    return {
        "value": verdict,
        "goal": "kld the only divergence that kept quality (Gen PPL <= teacher, entropy within 2%) every round",
        "met": verdict == "confirmed",
        "kept_quality": kept,
        "ranking_at_final_steps": ranking,
        "final_steps": last,
        "per_round": per_round,
    }


def _grid_ablation(rows: list[dict], full: int, rounds: int) -> dict:
    per_round = []
    for k in range(1, rounds + 1):
        own = max(1, full // 2**k)
        c, o = _row(rows, f"student-kld-r{k}", own), _row(rows, f"student-kld-r{k}-original-grid", own)
        if c and o:
            per_round.append(
                {
                    "round": k,
                    "steps": own,
                    "corrected": {"gen_ppl": c["gen_ppl"], "entropy": c["entropy"]},
                    "original": {"gen_ppl": o["gen_ppl"], "entropy": o["entropy"]},
                    "lower_gen_ppl": "corrected" if c["gen_ppl"] <= o["gen_ppl"] else "original",
                }
            )
    wins = sum(p["lower_gen_ppl"] == "corrected" for p in per_round)
    return {
        "value": f"corrected grid lower Gen PPL in {wins}/{len(per_round)} rounds",
        "goal": "reported",
        "met": None,
        "per_round": per_round,
    }


# ----------------------------------------------------------------------------------------- table
def _mark(met) -> str:
    return "reported" if met is None else ("met" if met else "NOT met")


def format_table(r: dict) -> str:
    s, h = r["settings"], r["harness"]
    teacher_params = r["parameters"].get("teacher", 0)
    lines = [
        f"bench sdtt: {s['teacher_model']} teacher ({teacher_params:,} params, {s['teacher_steps']} steps), "
        f"students {s['rounds']} rounds x {s['distill_steps_per_round']} steps, L={s['seq_len']}, "
        f"{s['num_samples']} samples per row",
        f"Gen PPL: {h['form']} form, evaluator {Path(h['evaluator']).parent.name} "
        f"({h['evaluator_parameters']:,} params, {h['evaluator_precision']}); MAUVE vs {s['mauve_references']}",
        f"{'model':<32}{'steps':>6}{'nfe':>6}{'gen ppl':>9}{'entropy':>9}{'mauve':>7}{'s/sample':>10}",
    ]
    for row in r["rows"] + r.get("ar", []):
        lines.append(
            f"{row['model']:<32}{row['steps']:>6}{row['nfe']:>6.0f}{row['gen_ppl']:>9.2f}{row['entropy']:>9.3f}"
            f"{row.get('mauve', math.nan):>7.3f}{row['seconds_per_sample']:>10.4f}"
        )
    for row in r.get("ar", []):
        note = " (the evaluator itself: its Gen PPL scores its own samples)" if row.get("self_scored") else ""
        lines.append(f"{row['model']}: {row['folder']}, {row['parameters']:,} params, KV cache{note}")
    tr = r.get("teacher_resample")
    if tr:
        lines.append(
            f"sampling noise: teacher at {tr['steps']} steps with other draws: Gen PPL {tr['gen_ppl']:.2f}, "
            f"entropy {tr['entropy']:.3f}"
        )
    gp = r.get("gumbel_precision")
    if gp:
        q64, q32 = gp["quality"]["float64"], gp["quality"]["float32"]
        lines.append(
            f"float64 vs float32 draws: the draw alone {gp['draw_ratio_fp64_over_fp32']:.2f}x the time "
            f"({'x'.join(map(str, gp['draw_shape']))}), a whole teacher sample at {gp['steps']} steps "
            f"{gp['sample_ratio_fp64_over_fp32']:.2f}x; Gen PPL {q64['gen_ppl']:.2f} (H {q64['entropy']:.3f}) "
            f"vs {q32['gen_ppl']:.2f} (H {q32['entropy']:.3f})"
        )
    if r.get("lambada_acc"):
        lines.append(f"LAMBADA ({r['lambada_examples']} dev passages, cut to L={s['seq_len']}):")
        lines.append(f"  {'model':<32}{'accuracy':>9}{'word ppl':>12}")
        for name, acc in r["lambada_acc"].items():
            lines.append(f"  {name:<32}{acc:>9.3f}{r['lambada_ppl'][name]:>12.4g}")
    lines.append("goals:")
    for name, g in r["goals"].items():
        v = g["value"]
        shown = f"{v:.3f}" if isinstance(v, float) else str(v)
        extra = f" (teacher {g['teacher']:.3f})" if "teacher" in g else ""
        lines.append(f"  {name}: {shown}{extra}; goal {g['goal']}: {_mark(g['met'])}")
    claim = r["goals"].get("divergences.reverse_kl_only_one_kept_quality")
    if claim:
        ranked = ", ".join(
            f"{x['divergence']} {x['gen_ppl']:.2f} (H {x['entropy']:.3f})" for x in claim["ranking_at_final_steps"]
        )
        lines.append(f"  divergences at {claim['final_steps']} steps, by Gen PPL: {ranked}")
        lines.append(f"  kept quality every round: {claim['kept_quality']}")
    grid = r["goals"].get("grid.corrected_vs_original")
    if grid:
        for p in grid["per_round"]:
            c, o = p["corrected"], p["original"]
            lines.append(
                f"  grid round {p['round']} ({p['steps']} steps): corrected {c['gen_ppl']:.2f} (H {c['entropy']:.3f})"
                f" vs original {o['gen_ppl']:.2f} (H {o['entropy']:.3f})"
            )
    for name, path in r.get("plots", {}).items():
        lines.append(f"plot {name}: {path}")
    if r.get("json"):
        lines.append(f"JSON: {r['json']}")
    return "\n".join(lines)
