"""`distilray <command> [--config FILE] [key=value ...] [--some-key VALUE ...]`

Every command builds its frozen config (YAML file, then overrides), then calls one pipeline. A flag
`--output-dir DIR` is the same as `output_dir=DIR`; corpus keys also work unprefixed
(`--dataset NAME` is `corpus.dataset=NAME`). Expected errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import typing

from distilray import config as C
from distilray.errors import DistilrayError

COMMANDS: dict[str, tuple[str, type]] = {
    "quickstart": ("the main job end to end on the embedded defaults", C.QuickstartConfig),
    "preprocess": ("write train/validation/test JSON splits of a corpus", C.PreprocessConfig),
    "train-tokenizer": ("train a byte-level BPE tokenizer on a corpus", C.TrainTokenizerConfig),
    "train-lm": ("train a causal LM with Ray Train", C.TrainLMConfig),
    "eval-ppl": ("sliding-window perplexity of a causal LM on a corpus split", C.EvalPPLConfig),
    "extract": ("CD-LM: token probabilities and hidden states of a corpus split, on Ray Data", C.ExtractConfig),
    "build-datastore": ("CD-LM: mine chunks and write the sharded datastore", C.BuildDatastoreConfig),
    "cdlm-generate": ("CD-LM: generate with the datastore (paper | verify | baseline)", C.CDLMGenerateConfig),
    "cdlm-ppl": ("CD-LM: perplexity by the chunk/token dynamic program beside the base LM's", C.CDLMPerplexityConfig),
    "fit-ngram": ("speculative decoding: count an n-gram drafter from a corpus on Ray Data", C.FitNGramConfig),
    "train-seq2seq": ("speculative decoding: train a T5 summarizer (target) or a T5 drafter distilled from it (teacher=) with Ray Train", C.TrainSeq2SeqConfig),
    "distill-drafter": ("speculative decoding: train a CNN/LSTM/transformer drafter from the target with Ray Train", C.DistillDrafterConfig),
}
# commands whose pipeline returns a JSON-able dict, printed as it is
JSON_PIPELINES = {"preprocess": "preprocess", "train-tokenizer": "train_tokenizer", "eval-ppl": "eval_ppl", "extract": "extract", "build-datastore": "build_datastore", "cdlm-generate": "cdlm_generate", "cdlm-ppl": "cdlm_ppl", "fit-ngram": "fit_ngram", "train-seq2seq": "train_seq2seq", "distill-drafter": "distill_drafter"}
BENCHMARKS: dict[str, tuple[str, type]] = {
    "train": ("Ray Train tokens/s against a bare torch loop", C.BenchTrainConfig),
    "cdlm": ("CD-LM: SCD, KCD, verify, extraction and datastore figures", C.BenchCDLMConfig),
    "speculative": ("speculative decoding: every drafter, baseline vs distilled, HF assisted, serving", C.BenchSpeculativeConfig),
}
FLAG_ALIASES = {"json": "json_out"}


def _top_level_keys(cls: type) -> tuple[set[str], set[str]]:
    """(plain fields, fields of the nested corpus section) of a command config."""
    hints = typing.get_type_hints(cls)
    plain = {f.name for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}
    corpus = {f.name for f in dataclasses.fields(C.CorpusSpec)} if "corpus" in hints else set()
    return plain, corpus


def flags_to_overrides(cls: type, extra: list[str]) -> list[str]:
    """Turn `--output-dir D`, `--dataset=X` and bare `key=value` items into override strings."""
    plain, corpus = _top_level_keys(cls)
    overrides: list[str] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        if item.startswith("--"):
            name, eq, value = item[2:].partition("=")
            if not eq:
                if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                    raise DistilrayError(f"flag --{name} needs a value")
                value, i = extra[i + 1], i + 1
            key = FLAG_ALIASES.get(name.replace("-", "_"), name.replace("-", "_"))
            if key not in plain and key in corpus:
                key = f"corpus.{key}"
            overrides.append(f"{key}={value}")
        elif "=" in item:
            key, _, value = item.partition("=")
            if key not in plain and key in corpus:
                key = f"corpus.{key}"
            overrides.append(f"{key}={value}")
        else:
            raise DistilrayError(f"unexpected argument {item!r}: use key=value or --key VALUE")
        i += 1
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distilray", description="Make language models faster and leaner, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, cls) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text}. Keys: {', '.join(C._all_keys(cls, ''))}")
        p.add_argument("--config", help="YAML file of config keys")
    bench = sub.add_parser("bench", help="benchmarks (JSON out)")
    bench.add_argument("benchmark", choices=sorted(BENCHMARKS))
    bench.add_argument("--config", help="YAML file of config keys")
    return parser


def dispatch(command: str, cfg) -> int:
    """Run one command; print a human summary and return the exit status."""
    if command == "quickstart":
        from distilray.pipelines import quickstart

        print(quickstart.format_summary(quickstart.run(cfg)))
    elif command in JSON_PIPELINES:
        module = importlib.import_module(f"distilray.pipelines.{JSON_PIPELINES[command]}")
        _print_json(module.run(cfg))
    elif command == "train-lm":
        from distilray.pipelines import train_lm

        result = train_lm.run(cfg)
        _print_json({k: v for k, v in result.items() if k != "config"})
    elif command.startswith("bench:"):
        module = importlib.import_module(f"distilray.bench.{command.split(':')[1]}")
        results = module.run(cfg)
        print(module.format_table(results))
        if cfg.json_out:
            print(f"wrote {cfg.json_out}")
    else:  # pragma: no cover - argparse restricts the choices
        raise DistilrayError(f"unknown command {command}")
    return 0


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command == "bench":
            cls = BENCHMARKS[args.benchmark][1]
            command = f"bench:{args.benchmark}"
        else:
            cls = COMMANDS[args.command][1]
            command = args.command
        cfg = C.load_config(cls, args.config, flags_to_overrides(cls, extra))
        return dispatch(command, cfg)
    except DistilrayError as e:
        print(f"distilray: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distilray: interrupted; re-run the same command to resume from the latest checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
