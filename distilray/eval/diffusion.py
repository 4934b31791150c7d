"""One pinned evaluation harness for masked diffusion LMs (reference/sdtt.md 3, 6.4): generative
perplexity, unigram entropy and LAMBADA, for a teacher and its students side by side.

Gen PPL depends on the harness more than on the model (reference/sdtt.md 4.6, 5): the form used here is
stated in `HARNESS` and returned with every figure. Always report `unigram_entropy` beside Gen PPL,
which low-entropy (repetitive) text games.

MAUVE: `distilray.eval.mauve` holds the score. Featurize human references and generations (token id
lists, prompt included) with the same causal LM, `mean_hidden_features(lm, sequences)`, then
`mauve(human_features, model_features)`; give it with its k-means seed, and mean +- std over seeds 1..5
on one fixed sample set (not over sampling seeds).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distilray.errors import DistilrayError
from distilray.losses.mdlm import SAMPLER_EPS, mask_tokens, nelbo_weight, sample_times

HARNESS: dict = {
    "form": "sdtt",  # run_eval.py uncond_eval of the SDTT code, not MDLM/Duo's compute_generative_perplexity
    "evaluator": "the caller's causal LM (SDTT: GPT-2 large); gen_ppl records its name_or_path",
    "evaluator_precision": "float32",
    "tokenization": "raw sample ids scored directly (the evaluator shares the sampler's tokenizer): no decode, "
    "no re-tokenization",
    "bos_prepended": False,
    "scored_tokens": "2..L of each sample (the first token has no context)",
    "eos_rule": "EOS tokens inside a sample are scored like any other token",
    "mean": "per-sample: PPL = exp(mean over samples of each sample's mean NLL over tokens 2..L)",
    "evaluator_batch_size": 8,
}

# One LAMBADA example: (prefix ids, target ids), the target without its EOS.
LambadaIds = tuple[list[int], list[int]]
LogProbsFn = Callable[[Tensor], Tensor]


# --- generative perplexity and entropy -------------------------------------------------------------------------


def _evaluator_vocab(evaluator) -> int | None:
    """The evaluator's input vocabulary, from its config or its embedding table; None when it has neither."""
    size = getattr(getattr(evaluator, "config", None), "vocab_size", None)
    if size is None and hasattr(evaluator, "get_input_embeddings"):
        size = evaluator.get_input_embeddings().num_embeddings
    return None if size is None else int(size)


def _evaluator_name(evaluator) -> str:
    name = getattr(getattr(evaluator, "config", None), "_name_or_path", None)
    return str(name) if name else type(evaluator).__name__


def _device_and_check_precision(evaluator) -> torch.device:
    params = list(evaluator.parameters()) if hasattr(evaluator, "parameters") else []
    wrong = {p.dtype for p in params if p.is_floating_point() and p.dtype != torch.float32}
    if wrong:
        raise DistilrayError(f"the Gen PPL harness scores in float32; load the evaluator in float32, not {wrong}")
    return params[0].device if params else torch.device("cpu")


@torch.no_grad()
def gen_ppl(evaluator, samples: Tensor, batch_size: int = 8) -> dict:
    """Generative perplexity of samples (S, L) under a causal LM `evaluator` (model(input_ids).logits # (B, L, V)),
    in the SDTT form of `HARNESS`: fp32, raw ids, no BOS, per-sample mean NLL over tokens 2..L, then exp of
    the mean over samples.

    Returns dict(gen_ppl, mean_nll, entropy, samples, tokens, harness); entropy is `unigram_entropy`, which
    belongs beside every Gen PPL. Ids outside the evaluator's vocabulary
    (a [MASK] left in a sample, or another tokenizer) are a DistilrayError.
    """
    samples = torch.as_tensor(samples, dtype=torch.long)
    if samples.dim() != 2 or samples.shape[1] < 2:
        raise DistilrayError(f"samples must be (S, L) with L >= 2, got {tuple(samples.shape)}")
    vocab = _evaluator_vocab(evaluator)
    device = _device_and_check_precision(evaluator)
    sample_nll = []
    for start in range(0, samples.shape[0], batch_size):
        ids = samples[start : start + batch_size].to(device)  # (B, L)
        _check_ids(ids, vocab)
        with torch.autocast(device_type=device.type, enabled=False):
            logits = evaluator(ids).logits.float()  # (B, L, V)
        _check_ids(ids, logits.shape[-1])
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, L-1)
        sample_nll.append(nll.mean(dim=1).double().cpu())
    mean_nll = float(torch.cat(sample_nll).mean())
    return {
        "gen_ppl": math.exp(mean_nll),
        "mean_nll": mean_nll,
        "entropy": unigram_entropy(samples),
        "samples": int(samples.shape[0]),
        "tokens": int(samples.shape[0] * (samples.shape[1] - 1)),
        "harness": dict(HARNESS, evaluator=_evaluator_name(evaluator), evaluator_batch_size=batch_size),
    }


def _check_ids(ids: Tensor, vocab: int | None) -> None:
    if vocab is None:
        return
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise DistilrayError(
            f"sample ids span {int(ids.min())}..{int(ids.max())} but the evaluator's vocabulary has {vocab} ids: "
            "the samples hold a [MASK] or come from another tokenizer (the harness scores raw ids)"
        )


def unigram_entropy(samples: Tensor) -> float:
    """Mean over samples (S, L) of H = -sum_v (c_v / L) ln(c_v / L), c_v the count of token v in the sample."""
    samples = torch.as_tensor(samples, dtype=torch.long)
    if samples.dim() != 2 or samples.numel() == 0:
        raise DistilrayError(f"samples must be a non-empty (S, L), got {tuple(samples.shape)}")
    entropies = []
    for row in samples:
        freq = torch.unique(row, return_counts=True)[1].double() / row.numel()
        entropies.append(float(-(freq * freq.log()).sum()))
    return sum(entropies) / len(entropies)


# --- LAMBADA --------------------------------------------------------------------------------------------------


def lambada_examples(path: str | Path | None = None) -> list[str]:
    """LAMBADA passages: one per line of a .txt file, or the `text` field of each line of a .jsonl file.

    None reads the dev split of the shared data folder (lambada_dev_plain_text.txt, the original
    lowercased, tokenized release: `it 's`).
    """
    if path is None:
        from distilray.corpus import SHARED_DATASETS, shared_data_dir

        path = shared_data_dir() / SHARED_DATASETS["lambada-dev"]
    path = Path(path)
    if not path.is_file():
        raise DistilrayError(f"LAMBADA file {path} not found")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"] for line in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DistilrayError(f"{path}: every line must be a JSON object with a 'text' field ({e})") from None
    return [line.rstrip("\r") for line in lines]


def split_lambada(text: str) -> tuple[str, str]:
    """Split at the last space: (prefix, target), the target keeping its leading space (' word')."""
    text = text.rstrip()
    cut = text.rfind(" ")
    if cut <= 0:
        raise DistilrayError(f"LAMBADA passage has no context before its last word: {text[:80]!r}")
    return text[:cut], text[cut:]


def tokenize_lambada(texts: list[str], tokenizer) -> list[LambadaIds]:
    """(prefix ids, target ids) per passage, encoded without special tokens; BOS and EOS are added where used."""
    out = []
    for text in texts:
        prefix, target = split_lambada(text)
        out.append(
            (
                list(tokenizer.encode(prefix, add_special_tokens=False)),
                list(tokenizer.encode(target, add_special_tokens=False)),
            )
        )
    return out


def _lambada_ids(example: LambadaIds, bos_id: int, eos_id: int, max_len: int | None) -> tuple[Tensor, slice]:
    """[BOS] + prefix + target + [EOS] # (L,), and the slice of the target; the prefix is cut from the left
    to fit max_len."""
    prefix, target = list(example[0]), list(example[1])
    if not target:
        raise DistilrayError("LAMBADA example with an empty target")
    if max_len is not None:
        room = max_len - len(target) - 2
        if room < 0:
            raise DistilrayError(f"LAMBADA target of {len(target)} tokens does not fit max_len {max_len}")
        prefix = prefix[len(prefix) - room :] if room else []
    ids = torch.tensor([bos_id, *prefix, *target, eos_id], dtype=torch.long)
    start = 1 + len(prefix)
    return ids, slice(start, start + len(target))


@torch.no_grad()
def lambada_accuracy(
    model_log_probs_fn: LogProbsFn,
    examples_ids: list[LambadaIds],
    mask_id: int,
    bos_id: int,
    eos_id: int,
    max_len: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Share of passages whose whole last word the model recovers in one pass.

    Input [BOS] + prefix + one [MASK] per target token + [EOS] (the EOS kept clean); one forward pass
    (at t = eps_s; the model is not time-conditioned); argmax over the real tokens ([MASK] excluded).
    Correct only if every target token matches. model_log_probs_fn: z (B, L) on `device` -> log-probs
    (B, L, V). max_len cuts the prefix from the left to fit the model's context.
    """
    if not examples_ids:
        raise DistilrayError("no LAMBADA examples")
    correct = 0
    for example in examples_ids:
        ids, target = _lambada_ids(example, bos_id, eos_id, max_len)
        z = ids.clone()
        z[target] = mask_id
        log_probs = model_log_probs_fn(z.unsqueeze(0).to(device))[0, target].float()  # (n_target, V)
        log_probs[:, mask_id] = -math.inf
        correct += bool((log_probs.argmax(-1).cpu() == ids[target]).all())
    return correct / len(examples_ids)


@torch.no_grad()
def lambada_ppl(
    model_log_probs_fn: LogProbsFn,
    examples_ids: list[LambadaIds],
    mask_id: int,
    bos_id: int,
    eos_id: int,
    generator: torch.Generator,
    num_t: int = 32,
    eps_s: float = SAMPLER_EPS,
    times: Tensor | None = None,
    max_len: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Per-WORD LAMBADA perplexity bound: exp(mean over passages of the word's NELBO).

    Per passage: num_t antithetic times (SDTT form, one batch), or the given `times` (T,); the prefix,
    BOS and EOS stay clean, the target tokens are masked by q(z_t | x); NLL summed over the masked target
    tokens, weighted by nelbo_weight(t) = 1/t, averaged over the times.
    model_log_probs_fn: z (T, L) on `device` -> log-probs (T, L, V); generator: a CPU generator (times
    and masks are drawn on the CPU, so a seed gives the same masks on any device).
    """
    if not examples_ids:
        raise DistilrayError("no LAMBADA examples")
    nelbos = []
    for example in examples_ids:
        ids, target = _lambada_ids(example, bos_id, eos_id, max_len)
        t = sample_times(num_t, generator, eps_s, form="sdtt") if times is None else torch.as_tensor(times).float()
        x = ids.expand(t.shape[0], -1)  # (T, L)
        in_target = torch.zeros_like(x, dtype=torch.bool)
        in_target[:, target] = True
        z = torch.where(in_target, mask_tokens(x, t, mask_id, generator), x)  # (T, L)
        log_probs = model_log_probs_fn(z.to(device))  # (T, L, V)
        nll = -log_probs.gather(-1, x.to(log_probs.device).unsqueeze(-1)).squeeze(-1).float().cpu()  # (T, L)
        masked_nll = torch.where(z == mask_id, nll, torch.zeros_like(nll)).sum(-1)  # (T,)
        nelbos.append(float((nelbo_weight(t.double()) * masked_nll.double()).mean()))
    return math.exp(sum(nelbos) / len(nelbos))
