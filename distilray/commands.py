"""Every `distilray` command, declared once: its name, what it does, its config class, the function
that runs it and how its result prints. argparse (cli.py), the command table in README.md and the
tests all read this list; `python -m distilray.commands` prints the README table.

A new method adds its rows here: `Command("train-mdlm", "...", TrainMDLMConfig, "distilray.pipelines.train_mdlm:run")`.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Literal

from distilray import config as C


@dataclass(frozen=True)
class Command:
    name: str  # `distilray <name>`; benchmarks are `bench <name>`
    help: str
    config: type
    run: str  # "module:function", imported only when the command runs (the CLI starts fast)
    prints: Literal["json", "table"] = "json"  # json: the result dict; table: the module's format_table(result)
    example: str = ""  # arguments shown in README's table

    def runner(self) -> Callable[[Any], Any]:
        module, _, func = self.run.partition(":")
        return getattr(importlib.import_module(module), func)

    def render(self, result: Any) -> str:
        """The result as the command prints it."""
        if self.prints == "table":
            return importlib.import_module(self.run.partition(":")[0]).format_table(result)
        shown = {k: v for k, v in result.items() if k != "config"} if isinstance(result, dict) else result
        return json.dumps(shown, indent=2, default=str)


COMMANDS: tuple[Command, ...] = (
    Command(
        "quickstart",
        "the main job end to end on the embedded defaults",
        C.QuickstartConfig,
        "distilray.pipelines.quickstart:run",
        "table",
    ),
    Command(
        "preprocess",
        "write train/validation/test JSON splits of a corpus",
        C.PreprocessConfig,
        "distilray.pipelines.preprocess:run",
        example="--dataset NAME --output-dir DIR",
    ),
    Command(
        "train-tokenizer",
        "train a byte-level BPE tokenizer on a corpus",
        C.TrainTokenizerConfig,
        "distilray.pipelines.train_tokenizer:run",
        example="dataset=NAME vocab_size=4096",
    ),
    Command(
        "train-lm",
        "train a causal LM with Ray Train",
        C.TrainLMConfig,
        "distilray.pipelines.train_lm:run",
        example="model=mini steps=600 num_workers=2",
    ),
    Command(
        "eval-ppl",
        "sliding-window perplexity of a causal LM on a corpus split",
        C.EvalPPLConfig,
        "distilray.pipelines.eval_ppl:run",
        example="model=PATH --dataset NAME split=test",
    ),
    Command(
        "extract",
        "CD-LM: token probabilities and hidden states of a corpus split, on Ray Data",
        C.ExtractConfig,
        "distilray.pipelines.extract:run",
        example="model=PATH --dataset NAME",
    ),
    Command(
        "build-datastore",
        "CD-LM: mine chunks and write the sharded datastore",
        C.BuildDatastoreConfig,
        "distilray.pipelines.build_datastore:run",
        example="extract_dir=DIR",
    ),
    Command(
        "cdlm-generate",
        "CD-LM: generate with the datastore (paper, verify or baseline mode)",
        C.CDLMGenerateConfig,
        "distilray.pipelines.cdlm_generate:run",
        example="model=PATH datastore=DIR mode=paper",
    ),
    Command(
        "cdlm-ppl",
        "CD-LM: perplexity by the chunk/token dynamic program beside the base LM's",
        C.CDLMPerplexityConfig,
        "distilray.pipelines.cdlm_ppl:run",
        example="model=PATH datastore=DIR --dataset NAME",
    ),
    Command(
        "fit-ngram",
        "speculative decoding: count an n-gram drafter from a corpus on Ray Data",
        C.FitNGramConfig,
        "distilray.pipelines.fit_ngram:run",
        example="tokenizer=MODEL_DIR n=3 --dataset NAME",
    ),
    Command(
        "distill-drafter",
        "speculative decoding: train a CNN/LSTM/transformer drafter from the target with Ray Train",
        C.DistillDrafterConfig,
        "distilray.pipelines.distill_drafter:run",
        example="target=MODEL_DIR drafter=lstm loss=fkl data=on_policy",
    ),
    Command(
        "train-seq2seq",
        "speculative decoding: a T5 summarizer (target), or a T5 drafter distilled from it (teacher=), with Ray Train",
        C.TrainSeq2SeqConfig,
        "distilray.pipelines.train_seq2seq:run",
        example="model=t5-mini [teacher=DIR loss=fkl]",
    ),
    Command(
        "train-mdlm",
        "SDTT: train a masked diffusion LM (MDLM, DiT) with Ray Train, the teacher",
        C.TrainMDLMConfig,
        "distilray.pipelines.train_mdlm:run",
        example="model=dit-mini steps=1000 dataset=NAME",
    ),
    Command(
        "distill-sdtt",
        "SDTT: rounds of self-distillation through time from an MDLM teacher, with Ray Train",
        C.DistillSDTTConfig,
        "distilray.pipelines.distill_sdtt:run",
        example="teacher=DIR loss=kld grow_dt_every=500 steps=3000",
    ),
    Command(
        "sample-diffusion",
        "SDTT: N samples of a diffusion LM (unconditional or prompted) on a Ray Data actor pool, as Parquet",
        C.SampleDiffusionConfig,
        "distilray.pipelines.sample_diffusion:run",
        example="model=DIR num_samples=64 num_steps=32",
    ),
    Command(
        "eval-diffusion",
        "SDTT: Gen PPL beside entropy, MAUVE, LAMBADA, NFE and time per sample over step counts",
        C.EvalDiffusionConfig,
        "distilray.pipelines.eval_diffusion:run",
        "table",
        example="model=DIR evaluator=LM_DIR steps=[64,32,16,8]",
    ),
    Command(
        "prepare-long",
        "Token weighting: cut long documents into BOS + (L-1)-token sequences (Parquet), held-out documents kept",
        C.PrepareLongConfig,
        "distilray.pipelines.prepare_long:run",
        example="dataset=gutenberg seq_len=2048",
    ),
    Command(
        "train-long",
        "Token weighting: long-context training with Dense/Sparse/LongCE/PPMI/NPMI weights, self or frozen scoring",
        C.TrainLongConfig,
        "distilray.pipelines.train_long:run",
        example="init=DIR seq_len=2048 weighting.variant=dense weighting.scorer=self",
    ),
    Command(
        "train-tfree",
        "T-Free: a tokenizer-free LM (hashed trigram words, multi-label head) or its BPE baseline, on Ray Train",
        C.TrainTFreeConfig,
        "distilray.pipelines.train_tfree:run",
        example="dataset=gutenberg model=tfree-tiny steps=300 (input=token: the BPE baseline)",
    ),
    Command(
        "generate-tfree",
        "T-Free: words from a trained model by dictionary decoding (head, union or calibrated scores)",
        C.GenerateTFreeConfig,
        "distilray.pipelines.generate_tfree:run",
        example='model=DIR prompt="The sea" max_words=32 decode_score=calibrated',
    ),
    Command(
        "eval-tfree",
        "T-Free: fertility, duplicates, sequence length, next-word accuracy and word perplexity against BPE",
        C.EvalTFreeConfig,
        "distilray.pipelines.eval_tfree:run",
        example="models=[DIR,DIR] dataset=gutenberg",
    ),
    Command(
        "eval-long",
        "Token weighting: long PPL by position, LongPPL, pass-key and key-value recall, short-context PPL",
        C.EvalLongConfig,
        "distilray.pipelines.eval_long:run",
        example="models=[DIR,DIR] data=DIR evaluator=DIR",
    ),
)

BENCHMARKS: tuple[Command, ...] = (
    Command(
        "train",
        "Ray Train tokens/s against a bare torch loop",
        C.BenchTrainConfig,
        "distilray.bench.train:run",
        "table",
        example="--json OUT",
    ),
    Command(
        "cdlm",
        "CD-LM: SCD, KCD, verify, extraction and datastore figures",
        C.BenchCDLMConfig,
        "distilray.bench.cdlm_run:run",
        "table",
        example="--json OUT",
    ),
    Command(
        "speculative",
        "speculative decoding: every drafter, baseline vs distilled, HF assisted, serving",
        C.BenchSpeculativeConfig,
        "distilray.bench.speculative_run:run",
        "table",
        example="--json OUT",
    ),
    Command(
        "serve",
        "both text apps under 1-16 concurrent clients over HTTP: batched vs one at a time, latency, TTFT, "
        "identical greedy answers, a fault under load",
        C.BenchServeConfig,
        "distilray.bench.serve_load:run",
        "table",
        example="--json OUT",
    ),
    Command(
        "sdtt",
        "SDTT: teacher and students of every divergence, Gen PPL beside entropy and MAUVE against steps, LAMBADA, "
        "AR baselines",
        C.BenchSDTTConfig,
        "distilray.bench.sdtt:run",
        "table",
        example="--json OUT",
    ),
    Command(
        "token-weighting",
        "Token weighting: every variant (frozen and self scoring) from one short start: long PPL, LongPPL, "
        "pass-key and key-value recall, short PPL, training time",
        C.BenchTokenWeightingConfig,
        "distilray.bench.token_weighting:run",
        "table",
        example="--json OUT",
    ),
    Command(
        "tfree",
        "T-Free against 8k and 32k BPE baselines of the same backbone: fertility, duplicates, parameters, memory, "
        "next-word accuracy, word perplexity",
        C.BenchTFreeConfig,
        "distilray.bench.tfree:run",
        "table",
        example="--json OUT",
    ),
)


def find(name: str, benchmark: bool = False) -> Command:
    for command in BENCHMARKS if benchmark else COMMANDS:
        if command.name == name:
            return command
    raise KeyError(name)


def config_class(header: str) -> type:
    """The config class of `train-lm` or `bench train` (as a config file's header names it)."""
    words = header.split()
    if words[0] == "bench":
        return find(words[1], benchmark=True).config
    return find(words[0]).config


def markdown_table() -> str:
    """README's command table."""
    rows = ["| command | what it does |", "|---|---|"]
    for command in COMMANDS:
        rows.append(
            f"| `distilray {command.name}{' ' + command.example if command.example else ''}` | {command.help} |"
        )
    for command in BENCHMARKS:
        rows.append(f"| `distilray bench {command.name} {command.example}` | {command.help} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
