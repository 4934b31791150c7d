"""Typed, frozen configs: one dataclass per command, composed of reusable sections, read from a YAML
file plus `key=value` overrides.

    cfg = load_config(TrainLMConfig, "configs/train_lm_small.yaml", ["steps=50", "optim.lr=3e-4"])
    cfg = config_from(TrainLMConfig, model="tiny", steps=50, lr=3e-4)   # in code; `lr` is `optim.lr`

Sections are addressed with dotted keys (`optim.lr`, `scale.num_workers`, `corpus.dataset`), or flat
where only one section has the key. An unknown key is an error that names it and lists the keys that
exist; a value of the wrong type, or a choice outside its `Literal`, is an error that names the key.
What enters an artifact's cache key is decided by one rule (config_loading.cache_key_fields): every
field but the run-only ones; the `scale` and `checkpoint` sections never do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar, Literal

# the loader lives beside the configs; these names are part of this module's interface
from distilray.config_loading import (  # noqa: F401
    Config,
    all_keys,
    cache_key_fields,
    choice,
    config_from,
    config_hash,
    config_to_dict,
    load_config,
    replace_keys,
    run_only,
)
from distilray.errors import DistilrayError

UseGPU = Literal["auto", "true", "false"]
Divergence = Literal["fkl", "rkl", "jsd", "tvd"]
WeightingVariant = Literal["uniform", "dense", "sparse", "longce", "ppmi", "npmi", "custom"]

# what the benchmarks' size sweeps may name (checked when their config is built)
CPU_PRESETS = ("tiny", "mini", "small")  # presets that train on a small CPU machine (the gpt2 family: GPUs)
NGRAM = re.compile(r"^ngram([1-4])$")  # a sweep's n-gram drafter, counted on the corpus
PROMPT_LOOKUP = "prompt-lookup"  # as decoding/drafters.py spells it


def check_sizes(key: str, sizes: tuple[str, ...]) -> None:
    """A non-empty list of distinct CPU presets, in any order."""
    if not sizes:
        raise DistilrayError(f"{key} is empty: name at least one preset of {', '.join(CPU_PRESETS)}")
    bad = [s for s in sizes if s not in CPU_PRESETS]
    if bad:
        raise DistilrayError(
            f"{key}: {bad[0]!r} is not a preset a CPU sweep trains; use {', '.join(CPU_PRESETS)} "
            "(larger targets: bring one with target=PATH)"
        )
    if len(set(sizes)) != len(sizes):
        raise DistilrayError(f"{key} names a preset twice: {list(sizes)}")


def check_sweep_drafters(names: tuple[str, ...]) -> None:
    """ngram1..ngram4, transformer and prompt-lookup specs: the drafters that depend on the tokenizer alone."""
    if not names:
        raise DistilrayError("sweep_drafters is empty: name at least one of ngram3, prompt-lookup, transformer")
    for name in names:
        lookup = name == PROMPT_LOOKUP or name.startswith(PROMPT_LOOKUP + ":")
        if not (NGRAM.match(name) or lookup or name == "transformer"):
            raise DistilrayError(
                f"sweep_drafters: {name!r} is not a sweep drafter; use ngram1..ngram4, transformer, "
                "prompt-lookup (or prompt-lookup:n=3,k=8)"
            )


# --------------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class CorpusSpec(Config):
    """Where text comes from and how it is split (see distilray.corpus)."""

    dataset: str = "pydoc"  # built-in name, ../shared/data name, local file/folder, or hf:NAME[:CONFIG]
    text_field: str = "text"  # field holding the text in .jsonl / Parquet / HF rows
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    split_seed: int = 0


@dataclass(frozen=True)
class OptimConfig(Config):
    """AdamW (decay on matrices only) with linear warm-up, then cosine decay to `min_lr_ratio * lr`."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class ScaleConfig(Config):
    """How a Ray Train run is spread; never part of an artifact's cache key."""

    RUN_ONLY: ClassVar[bool] = True
    num_workers: int = 1  # data-parallel workers; the global batch splits evenly across them
    cpus_per_worker: int = 0  # 0: this machine's CPUs divided by num_workers (local), 1 on a cluster
    use_gpu: UseGPU = "auto"  # auto: GPUs when the cluster has any


@dataclass(frozen=True)
class CheckpointConfig(Config):
    """When a Ray Train run checkpoints and reports; never part of an artifact's cache key."""

    RUN_ONLY: ClassVar[bool] = True
    every: int = 100  # steps between checkpoints (flat key: checkpoint_every); the last step always checkpoints
    report_every: int = 50  # Ray Train reports; metrics.csv and TensorBoard get every step
    keep: int = 2  # checkpoints kept on disk (flat key: keep_checkpoints)
    max_failures: int = 1  # worker-group restarts from the latest checkpoint before giving up


# ------------------------------------------------------------------------------------- commands
@dataclass(frozen=True)
class PreprocessConfig(Config):
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    output_dir: str = "data/preprocessed"


@dataclass(frozen=True)
class TrainTokenizerConfig(Config):
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    vocab_size: int = 4096
    min_frequency: int = 2
    output_dir: str = ""  # empty: cached under artifacts_dir/tokenizers, keyed by config
    artifacts_dir: str = "artifacts"


@dataclass(frozen=True)
class TrainLMConfig(Config):
    """`train-lm`: a causal LM trained with Ray Train (DDP)."""

    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    model: str = "mini"  # size preset (distilray.models.causal_lm.PRESETS) or a HF path / local folder
    tokenizer: str = ""  # HF path / local folder; empty: a BPE trained on the corpus (cached)
    vocab_size: int = 4096  # for the trained BPE
    seq_len: int = 128
    batch_size: int = 16  # global, split evenly across workers
    steps: int = 300
    dropout: float = 0.0
    optim: OptimConfig = field(default_factory=OptimConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval_max_tokens: int = 50_000  # validation tokens for the final perplexity
    artifacts_dir: str = run_only("artifacts")
    name: str = run_only("")  # run name; empty: derived from the model and the config hash
    seed: int = 0


@dataclass(frozen=True)
class EvalPPLConfig(Config):
    model: str = ""  # HF path / local save_pretrained folder (required)
    tokenizer: str = ""  # empty: the model's folder
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    split: str = "test"
    context_len: int = 0  # 0: the model's maximum context
    stride: int = 0  # 0: context_len // 2
    max_tokens: int = 100_000  # 0: the whole split
    batch_size: int = 8
    output: str = ""  # optional JSON file for the result


@dataclass(frozen=True)
class QuickstartConfig(Config):
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    artifacts_dir: str = "artifacts"
    vocab_size: int = 4096
    target_model: str = "mini"
    target_steps: int = 400
    drafter_model: str = "tiny"
    drafter_steps: int = 300
    seq_len: int = 128
    batch_size: int = 16
    num_workers: int = 1
    sample_prompt: str = "The for statement"
    sample_tokens: int = 40
    cdlm_window: int = 128
    cdlm_stride: int = 112
    cdlm_tok_prob_threshold: float = 0.3
    cdlm_similarity_threshold: float = 0.9
    cdlm_prompts: int = 8
    cdlm_new_tokens: int = 48
    spec_distill_steps: int = 150  # the stage-1 drafter, distilled from the target (fkl) for this many steps
    spec_gamma: int = 4
    # the CPU deployment path (serve_config.yaml's quantize): int8 target and drafters, lossless w.r.t. that model
    quantize: Literal["none", "int8"] = "int8"
    spec_prompts: int = 8
    spec_new_tokens: int = 48
    sdtt_teacher_model: str = "dit-tiny"  # the MDLM teacher (distilray.models.mdlm.PRESETS)
    sdtt_seq_len: int = 64
    sdtt_teacher_steps: int = 260
    sdtt_distill_steps: int = 100  # one round of self-distillation
    sdtt_orig_num_steps: int = 64  # the teacher's sampling steps; the round's student samples with half
    sdtt_samples: int = 16
    long_dataset: str = "gutenberg"  # long documents (../shared/data), one held out for the test
    long_start_model: str = "llama-tiny"  # distilray.models.rotary_lm.LLAMA_PRESETS
    long_base_length: int = 128  # the start's context, and b of the weighting
    long_seq_len: int = 512  # the extended context
    long_start_steps: int = 120
    long_steps: int = 30  # extension steps, uniform and weighted alike
    long_rope_theta: float = 40_000.0
    long_variant: WeightingVariant = "dense"
    long_max_sequences: int = 0  # cap on the prepared training sequences (0: all)
    long_eval_sequences: int = 8
    long_probes: int = 6  # pass-key probes per distance and depth
    tfree_model: str = "tfree-tiny"  # distilray.models.tfree_lm.PRESETS, trained on long_dataset's documents
    tfree_steps: int = 250
    tfree_batch_size: int = 8
    tfree_seq_len: int = 128  # words per sample
    tfree_eval_words: int = 2000
    tfree_prompt: str = "It was a dark night, and"
    tfree_words: int = 16
    tfree_top_k: int = 20  # the sample: calibrated scores at the fitted temperature, among the 20 best words
    seed: int = 0


@dataclass(frozen=True)
class BenchTrainConfig(Config):
    model: str = "mini"
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    warmup_steps: int = 5  # untimed steps before measuring
    steps: int = 30  # timed steps per setting
    worker_counts: tuple[int, ...] = (1, 2)
    eval_data: str = ""  # optional text to train on; empty: the built-in corpus
    artifacts_dir: str = "artifacts"
    json_out: str = ""
    seed: int = 0


@dataclass(frozen=True)
class ExtractConfig(Config):
    """CD-LM step 2: token probabilities (datastore model) and hidden states (generation model)."""

    model: str = ""  # generation model: its hidden states become the keys (required)
    datastore_model: str = ""  # model whose probabilities mine the chunks; empty: `model` (KCD: a larger LM)
    tokenizer: str = ""  # empty: the generation model's folder
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    split: str = "train"
    window: int = 512
    stride: int = 448
    min_length: int = 64  # passages shorter than this (in tokens) are dropped
    windows_per_shard: int = 64
    batch_size: int = 8
    num_actors: int = 1
    cpus_per_actor: int = 0  # 0: the machine's CPUs divided by num_actors (local), 1 on a cluster
    use_gpu: UseGPU = "auto"
    save_hidden: bool = True
    max_windows: int = 0  # 0: all
    output_dir: str = "artifacts/extract"


@dataclass(frozen=True)
class BuildDatastoreConfig(Config):
    """CD-LM steps 3-4: mine chunks from an extraction and write the sharded key/chunk datastore."""

    extract_dir: str = "artifacts/extract/train"  # a finished `distilray extract` split folder
    tok_prob_threshold: float = 0.3  # gamma: a token is confident when p > gamma (strict)
    num_shards: int = 2
    max_keys_per_chunk: int = 0  # 0: keep every occurrence's key
    output_dir: str = "artifacts/datastore"


@dataclass(frozen=True)
class CDLMGenerateConfig(Config):
    """CD-LM step 5: generation with the datastore (the seed's eval.py), one JSON per prompt."""

    model: str = ""  # generation model (required)
    datastore: str = "artifacts/datastore"
    prompt_file: str = ""  # JSON list of strings; empty: prompts cut from the corpus test split
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    num_prompts: int = 20
    prompt_tokens: int = 32
    mode: Literal["paper", "verify", "baseline"] = "paper"  # paper: append chunks unverified; verify: lossless
    gen_baseline_only: bool = False  # the seed's flag: same as mode=baseline
    similarity_threshold: float = 0.5
    max_new_tokens: int = 50
    temperature: float = 0.0
    save_dir: str = "artifacts/cdlm_generations"
    quantize: Literal["none", "int8"] = "none"  # int8: the model quantised for the CPU (models/quantize.py)
    # shards: the sharded datastore actors (one Ray round trip a lookup); local: loaded in this process
    datastore_placement: Literal["shards", "local"] = "shards"
    seed: int = 0


@dataclass(frozen=True)
class CDLMPerplexityConfig(Config):
    """CD-LM perplexity (dynamic program over chunk/token switches) beside the base LM's."""

    model: str = ""
    datastore: str = "artifacts/datastore"
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    split: str = "test"
    seq_len: int = 512
    num_sequences: int = 50
    q_func: str = "map05_09"  # identity | map{A}_{B} | map{A}_{B}_0
    q_func_max_prob: float = 1.0
    output: str = ""


@dataclass(frozen=True)
class BenchCDLMConfig(Config):
    """`distilray bench cdlm`: SCD, KCD, verify, extraction and datastore figures in one run."""

    artifacts_dir: str = "artifacts"
    generator_steps: int = 400  # the quickstart target (cached); more steps: a more confident, more overfit model
    eval_data: str = ""  # text for the SCD/verify prompts; empty: the built-in corpus's test split
    prompts: int = 20
    prompt_tokens: int = 32
    max_new_tokens: int = 64
    scd_samples: int = 5  # sampled answers per prompt that make the SCD datastore (the paper: 5)
    scd_temperature: float = 0.3
    tok_prob_threshold: float = 0.3
    similarity_threshold: float = 0.9
    kcd_domains: tuple[str, ...] = ("dockerfile", "medquad")
    kcd_finetune_steps: int = 150
    kcd_window: int = 256
    kcd_stride: int = 224
    kcd_max_windows: int = 300
    kcd_sequences: int = 30
    q_funcs: tuple[str, ...] = ("map05_09", "map08_05", "map09_03", "map095_02", "map098_01")
    extract_windows: int = 1000
    datastore_keys: int = 1_000_000
    datastore_dim: int = 256
    datastore_queries: int = 2000
    quantize: Literal["none", "int8"] = "none"  # int8: the generator quantised for the CPU (models/quantize.py)
    # a user's generator instead of the quickstart's: a causal LM folder (save_pretrained) with its tokenizer
    model: str = ""
    sweep: bool = False  # also SCD and verify against generator size (bench/cdlm_sweep.py)
    sweep_only: bool = False  # the sweep alone
    sweep_sizes: tuple[str, ...] = ("tiny", "mini", "small")  # presets trained generator_steps steps (cached)
    sweep_prompts: int = 8  # SCD prompts per sweep generator
    json_out: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()

        if self.sweep or self.sweep_only:
            check_sizes("sweep_sizes", self.sweep_sizes)


@dataclass(frozen=True)
class FitNGramConfig(Config):
    """Speculative decoding: an n-gram drafter counted from a corpus with a Ray Data aggregation."""

    tokenizer: str = ""  # the target's tokenizer (its model folder): drafter and target must share it
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    split: str = "train"
    n: int = 3
    pseudo_data: str = ""  # instead of the corpus: a distill-drafter pseudo-data folder (target generations)
    num_blocks: int = 8  # corpus shards counted in parallel, then merged
    output_dir: str = "artifacts/drafters/ngram"


@dataclass(frozen=True)
class TrainSeq2SeqConfig(Config):
    """An encoder-decoder (T5) summarizer on article -> highlights pairs with Ray Train; with `teacher`,
    a drafter distilled from a T5 target (FastLLM's recipe: divergence at a temperature plus CE)."""

    dataset: str = "cnndm"  # pairs: cnndm (../shared/data) or a .jsonl/.json file with article and highlights fields
    val_pairs: int = 25  # held out for the validation loss (a seeded split, as the corpus splits documents)
    test_pairs: int = 25  # held out for benchmarks; never trained on
    split_seed: int = 0
    model: str = "t5-mini"  # seq2seq preset (distilray.models.seq2seq_lm.SEQ2SEQ_PRESETS) or HF path / folder
    tokenizer: str = ""  # empty: the teacher's, else a BPE trained on the corpus (preset) or the model's own
    vocab_size: int = 4096  # for the trained BPE
    max_source_tokens: int = 384  # articles are cut to this (eos included)
    max_target_tokens: int = 96  # summaries are cut to this (eos included)
    teacher: str = ""  # seq2seq model folder / name: distil from its logits on the same batch
    loss: Divergence = "fkl"  # with a teacher
    temperature: float = 1.0  # of both distributions in the divergence
    ce_weight: float = 0.0  # weight of cross-entropy on the gold summary added to the divergence
    batch_size: int = 8  # global, split evenly across workers
    steps: int = 300
    dropout: float = 0.0
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=20, weight_decay=0.01))
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    artifacts_dir: str = run_only("artifacts")
    name: str = run_only("")  # run name; empty: derived from the model and the config hash
    seed: int = 0


@dataclass(frozen=True)
class DistillDrafterConfig(Config):
    """Speculative decoding: a drafter trained from the target (knowledge distillation) on Ray Train."""

    target: str = ""  # the target: HF causal LM folder or name (required); its tokenizer is the drafter's
    drafter: Literal["cnn", "lstm", "transformer"] = choice("transformer", "n-gram drafters: distilray fit-ngram")
    drafter_size: str = ""  # transformer: GPT-2 preset (default tiny); cnn/lstm: width d_model (default 128)
    init: str = ""  # a saved drafter folder of the same kind to start from; empty: fresh weights
    data: Literal["corpus", "pseudo", "on_policy"] = "corpus"  # pseudo: target generations; on_policy: drafter's
    loss: Literal["ce", "fkl", "rkl", "jsd", "tvd"] = "fkl"  # ce: cross-entropy on the data only, the baseline
    temperature: float = 1.0  # of both distributions in the divergence
    ce_weight: float = 0.0  # weight of cross-entropy on the data added to the divergence
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, weight_decay=0.0))
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    prompt_tokens: int = 16  # pseudo / on_policy: corpus prefix each generated sequence starts from
    pseudo_sequences: int = 512  # pseudo: sequences the target generates
    sample_temperature: float = 1.0  # pseudo / on_policy: sampling temperature of the generations
    pseudo_actors: int = run_only(1)  # pseudo: target actors in the Ray Data pool
    on_policy_fraction: float = 0.5  # on_policy: share of each batch sampled from the drafter (rest: corpus)
    eval_tokens: int = 20_000  # validation tokens for the final agreement figures
    artifacts_dir: str = run_only("artifacts")
    output_dir: str = run_only("")  # empty: artifacts_dir/drafters/<kind>-<loss>-<data>-<hash>
    seed: int = 0


@dataclass(frozen=True)
class BenchSpeculativeConfig(Config):
    """`distilray bench speculative`: every drafter kind, baseline vs distilled, against plain decoding."""

    artifacts_dir: str = "artifacts"
    eval_data: str = ""  # text for the held-out prompts; empty: the built-in corpus's test split
    prompts: int = 16  # held-out prompts; the first half picks each drafter's gamma, the second half is reported
    prompt_tokens: int = 32
    new_tokens: int = 64
    gammas: tuple[int, ...] = (1, 2, 3, 4, 6, 8)
    drafter_steps: int = 300  # training steps of each neural drafter (baseline and distilled alike)
    distill_loss: Literal["ce", "fkl", "rkl", "jsd", "tvd"] = "fkl"
    distill_data: Literal["corpus", "pseudo", "on_policy"] = "corpus"
    pseudo_sequences: int = 512  # target generations the distilled n-grams are counted on
    pseudo_temperature: float = 0.7
    threads: int = 1  # torch threads while timing decoding (the serve replica gets the same)
    include_t5: bool = True  # the encoder-decoder setting on cnndm (trains its own small T5s)
    quantize: Literal["none", "int8"] = "none"  # int8: target and neural drafters quantised (models/quantize.py)
    # a user's target instead of the quickstart's: a causal LM folder (save_pretrained) with its tokenizer
    target: str = ""
    # with target: NAME=SPEC items, SPEC a saved drafter folder (any kind) or a prompt-lookup spec
    drafters: tuple[str, ...] = ()
    sweep: bool = False  # also the target-size sweep (bench/speculative_sweep.py)
    sweep_only: bool = False  # the sweep alone
    sweep_sizes: tuple[str, ...] = ("tiny", "mini", "small")  # presets, trained the quickstart's way (cached)
    sweep_steps: int = 400  # training steps of every sweep target (the quickstart's target_steps: mini is cached)
    sweep_prompts: int = 8  # held-out prompts per sweep target
    sweep_drafters: tuple[str, ...] = ("ngram3", "prompt-lookup", "transformer")  # ngram1-4, transformer, PL specs
    json_out: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        from distilray.errors import DistilrayError

        if self.drafters and not self.target:
            raise DistilrayError("drafters= measures a user's target: set target=PATH too")
        if self.sweep or self.sweep_only:
            check_sizes("sweep_sizes", self.sweep_sizes)
            check_sweep_drafters(self.sweep_drafters)


@dataclass(frozen=True)
class BenchServeConfig(Config):
    """`distilray bench serve`: the speculative and CD-LM apps under 1-16 concurrent clients over HTTP,
    batched against one request at a time, then a replica and a datastore shard killed under load."""

    artifacts_dir: str = "artifacts"
    target: str = ""  # a causal LM folder; empty: the quickstart's target (trained and cached)
    levels: tuple[int, ...] = (1, 2, 4, 8, 16)  # concurrent clients
    requests_per_client: int = 4
    max_tokens: int = 32  # greedy tokens a request
    gamma: int = 4
    max_batch_size: int = 8
    quantize: Literal["none", "int8"] = "none"
    one_client_prompts: int = 8  # one client, served vs in process, alternating (twice each)
    cdlm_tts_prompts: int = 8  # CD-LM paper vs baseline, served and in process, one client (0: skip)
    fault: bool = True  # the fault-under-load run
    fault_seconds: float = 30.0
    transport_rounds: int = 500  # drafter round trips: loopback socket vs Ray Compiled Graph vs actor call (0: skip)
    json_out: str = ""
    seed: int = 0


# ------------------------------------------------------------------------------------------ SDTT
DiffusionDivergence = Literal["kld", "kl-fwd", "mse", "tvd", "l1-log", "jsd"]


@dataclass(frozen=True)
class TrainMDLMConfig(Config):
    """`train-mdlm`: a masked diffusion LM (MDLM, DiT backbone) on Ray Train: the SDTT teacher."""

    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    model: str = "dit-mini"  # distilray.models.mdlm.PRESETS, or a saved MDLM folder to continue from
    tokenizer: str = ""  # a folder with a mask token; empty: the project's BPE trained on the corpus (cached)
    vocab_size: int = 4096  # for the trained BPE
    seq_len: int = 128  # L: blocks are [bos] + L-2 tokens + [eos] (MDLM's convention)
    batch_size: int = 32  # global, split evenly across workers
    steps: int = 1000
    dropout: float = 0.1
    time_sampling: Literal["mdlm", "sdtt"] = "mdlm"  # antithetic: one uniform per sample, or one per batch
    sampling_eps: float = 1e-3  # t ~ U[sampling_eps, 1]
    ema: float = 0.999  # EMA decay of the weights used for sampling (MDLM at scale: 0.9999)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-4, min_lr_ratio=1.0, warmup_steps=100, weight_decay=0.0)
    )
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval_blocks: int = 64  # validation blocks for the final NELBO bound
    artifacts_dir: str = run_only("artifacts")
    name: str = run_only("")  # run name; empty: derived from the model and the config hash
    seed: int = 0


@dataclass(frozen=True)
class DistillSDTTConfig(Config):
    """`distill-sdtt`: rounds of self-distillation through time from an MDLM teacher, on Ray Train."""

    teacher: str = ""  # a train-mdlm model folder (required); its tokenizer and block length are kept
    loss: DiffusionDivergence = "kld"  # kld: reverse KL, the original's kl-bwd; l1-log: the original's "tvd"
    num_teacher_steps: int = 2  # m: the student learns in one step what the teacher does in m
    orig_num_steps: int = 1024  # the first teacher's step count: delta_0 = (1 - eps) / orig_num_steps
    grow_dt_every: int = 500  # optimizer steps per round; then the teacher takes the student's weights
    min_sampling_steps: int = 8  # no round whose student would sample with fewer steps
    teacher_grid: Literal["corrected", "original"] = "corrected"  # original: the released code's time grid
    float64: bool = True  # Gumbel draws of the teacher trajectory in float64
    ema: float = 0.999
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    batch_size: int = 32
    steps: int = 1000  # total optimizer steps (rounds = steps / grow_dt_every)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-4, min_lr_ratio=1.0, warmup_steps=50, weight_decay=0.0)
    )
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval_blocks: int = 64
    artifacts_dir: str = run_only("artifacts")
    output_dir: str = run_only("")  # empty: artifacts_dir/sdtt/<loss>-<hash>
    seed: int = 0


@dataclass(frozen=True)
class SampleDiffusionConfig(Config):
    """`sample-diffusion`: N samples of a masked diffusion LM on a Ray Data actor pool, written as Parquet."""

    model: str = ""  # an MDLM folder: a train-mdlm model or a distill-sdtt round (required)
    num_samples: int = 32
    num_steps: int = 64  # ancestral steps per sample
    prompt_tokens: int = 0  # 0: unconditional; else prompts of this many tokens cut from the corpus test split
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    temperature: float = 1.0
    float64: bool = True  # Gumbel draws in float64 (fp32 lowers entropy and Gen PPL together)
    cache_predictions: bool = False  # reuse x_theta when a step revealed nothing (pays only for steps >> L)
    batch_size: int = 8
    num_actors: int = 1
    cpus_per_actor: int = run_only(0)  # 0: the machine's CPUs divided by num_actors (local), 1 on a cluster
    use_gpu: UseGPU = run_only("auto")
    output_dir: str = run_only("artifacts/diffusion_samples")
    seed: int = 0


@dataclass(frozen=True)
class EvalDiffusionConfig(Config):
    """`eval-diffusion`: the pinned harness (Gen PPL beside entropy, MAUVE, LAMBADA, NFE and time per
    sample against a KV-cached autoregressive model) over step counts, for one diffusion LM."""

    model: str = ""  # an MDLM folder (required)
    evaluator: str = ""  # a causal LM sharing the tokenizer, scored in fp32 (required for Gen PPL and MAUVE)
    ar_baseline: str = ""  # a causal LM of similar size: its samples and seconds per sample with a KV cache
    steps: tuple[int, ...] = (64, 32, 16, 8)
    num_samples: int = 16
    batch_size: int = 8
    temperature: float = 1.0
    float64: bool = True
    mauve: bool = True  # samples against held-out blocks of the corpus, both featurized by the evaluator
    lambada_file: str = ""  # empty: the LAMBADA dev file of ../shared/data; "none": skip LAMBADA
    lambada_examples: int = 100  # the first N passages (0: all)
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    num_actors: int = 1
    output_dir: str = run_only("artifacts/diffusion_eval")
    json_out: str = run_only("")
    seed: int = 0


@dataclass(frozen=True)
class BenchSDTTConfig(Config):
    """`distilray bench sdtt`: an MDLM teacher and its SDTT students (one run per divergence, plus the
    original-grid ablation) sampled and scored side by side in one harness, against steps."""

    artifacts_dir: str = "artifacts"
    eval_data: str = ""  # held-out text for MAUVE's references (its test split); empty: the built-in corpus
    teacher_model: str = "dit-tiny"  # distilray.models.mdlm.PRESETS
    seq_len: int = 64
    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    teacher_ema: float = 0.999  # the sampled weights average about the last 1000 of 3000 steps
    distill_steps: int = 120  # optimizer steps per round (grow_dt_every)
    rounds: int = 3  # students sample with orig_num_steps / 2, / 4, / 8
    orig_num_steps: int = 64  # the teacher's largest step count (delta_0 = (1 - eps) / orig_num_steps)
    distill_lr: float = 3e-4
    distill_ema: float = 0.9  # rounds are short: the sampled (EMA) student must follow the raw weights
    batch_size: int = 32  # the teacher's
    distill_batch_size: int = 16  # the students': a distillation step costs two teacher passes more
    divergences: tuple[str, ...] = ("kld", "kl-fwd", "mse", "tvd", "l1-log", "jsd")
    grid_ablation: bool = True  # also the kld run on the released code's teacher grid (teacher_grid=original)
    steps: tuple[int, ...] = (64, 32, 16, 8, 4)  # rows: the teacher at each; a student at its own count and below
    num_samples: int = 64  # unconditional samples per (model, steps)
    sample_batch_size: int = 32
    threads: int = 1  # torch threads while sampling and timing (diffusion and AR alike)
    mauve: bool = True
    lambada_examples: int = 100  # the first N passages of LAMBADA dev (0: skip LAMBADA)
    lambada_all_rounds: bool = False  # LAMBADA for every round's student; False: the teacher and each run's last
    speed_repeats: int = 3  # alternating timings of teacher (full steps) and final kld student: median
    json_out: str = ""
    seed: int = 0


# ------------------------------------------------------------------ token-weighted long context
@dataclass(frozen=True)
class PrepareLongConfig(Config):
    """`prepare-long`: long documents cut into BOS + (seq_len - 1) token sequences, one document per sequence,
    no token dropped between chunks, held-out documents kept whole (Parquet + meta.json)."""

    dataset: str = "gutenberg"  # ../shared/data name, any folder or file of text, hf:NAME, or pg19
    text_field: str = "text"
    tokenizer: str = ""  # a tokenizer or model folder; empty: the project's BPE trained on `dataset` (cached)
    vocab_size: int = 4096  # for that BPE
    seq_len: int = 2048
    validation_documents: int = 1
    test_documents: int = 1
    max_sequences: int = 0  # cap on training sequences (0: all)
    output_dir: str = run_only("")  # empty: artifacts_dir/long_data/<dataset>-<seq_len>-<hash>
    datasets_folder: bool = run_only(False)  # also write <output_dir>/datasets (datasets.load_from_disk)
    artifacts_dir: str = run_only("artifacts")
    overwrite: bool = run_only(False)
    seed: int = 0


@dataclass(frozen=True)
class WeightingConfig(Config):
    """Per-token loss weights from log(p_short / p_long) (reference/token_weighting.md 4): one of the paper's
    variants with its parameter, or `custom` with every step given. A parameter the variant does not use is
    an error, never silently ignored."""

    variant: WeightingVariant = choice("dense", "uniform: plain cross-entropy; custom: transforms + steps below")
    lam: float | None = None  # dense: interpolation lambda (0.75); custom: interpolation
    kappa: float | None = None  # sparse, ppmi, npmi: top-kappa share (0.25); custom: sparsification
    gamma: float | None = None  # longce: truncation (5.0); custom: truncation
    shift: float | None = None  # ppmi, npmi: s in `shift s` (1.0)
    transforms: tuple[str, ...] = ()  # custom only: absolute, minus, exp, max, shift:C (applied in order)
    normalization: Literal["", "none", "l1", "softmax"] = ""  # custom only ("" = none)
    scorer: Literal["self", "frozen"] = "self"  # self: the trained model scores itself (unfrozen)
    scorer_model: str = ""  # frozen: the scorer's folder; empty: the short-context start (`init`)
    base_length: int = 512  # b: short-context window
    base_stride: int = 384  # s: (seq_len - b) % s == 0; (1 - b/L) b gives L/b extra passes
    windows_per_pass: int = run_only(8)  # short windows stacked into one no-grad forward pass

    def __post_init__(self) -> None:
        super().__post_init__()
        from distilray.losses.token_weighting import custom_or_preset

        custom_or_preset(self)  # one clear error for a combination that is refused


@dataclass(frozen=True)
class TrainLongConfig(Config):
    """`train-long`: a rotary-position causal LM trained at `seq_len` with token-weighted cross-entropy,
    from scratch (a short-context start) or extended from `init` (context extension)."""

    data: str = ""  # a prepare-long folder; empty: prepare `dataset` at `data_seq_len` (cached)
    dataset: str = "gutenberg"
    data_seq_len: int = 2048  # length of the prepared sequences; training rows are cut to seq_len
    init: str = ""  # the model to extend (a rotary causal LM folder); empty: a fresh `model`
    model: str = "llama-mini"  # distilray.models.rotary_lm.LLAMA_PRESETS, when init is empty
    tokenizer: str = ""  # with init empty: a tokenizer folder; empty: the project's BPE on `dataset`
    vocab_size: int = 4096
    seq_len: int = 2048
    rope_theta: float = 0.0  # 0: keep the start's (10000 for a fresh model)
    rope_type: Literal["default", "linear"] = "default"  # linear: position interpolation by rope_factor
    rope_factor: float = 1.0
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    batch_size: int = 4  # global, split evenly across workers
    steps: int = 100
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-4, min_lr_ratio=1.0, warmup_steps=20, weight_decay=0.01)
    )
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval_sequences: int = 8  # validation sequences for the final perplexity by position
    artifacts_dir: str = run_only("artifacts")
    name: str = run_only("")  # run name; empty: derived from the variant and the config hash
    seed: int = 0


@dataclass(frozen=True)
class EvalLongConfig(Config):
    """`eval-long`: long-context perplexity by position, LongPPL, passkey and key-value recall, short-context
    perplexity, for one or more models on the held-out documents of a prepare-long folder."""

    models: tuple[str, ...] = ()  # model folders (required)
    data: str = ""  # a prepare-long folder (its test documents)
    split: Literal["validation", "test"] = "test"
    evaluator: str = ""  # LongPPL's evaluator model folder; empty: LongPPL not computed
    short_length: int = 256  # LongPPL's K
    short_step: int = 128  # LongPPL's d
    base_length: int = 512  # the position-bucket boundary (the training's b)
    sequences: int = 16  # held-out sequences for the long perplexity (0: all)
    probe_distances: tuple[int, ...] = (128, 512, 1024)  # tokens between fact and question (those that fit)
    probes_per_distance: int = 10
    short_context: int = 256  # context of the short-context perplexity
    short_tokens: int = 20_000
    output: str = ""  # optional JSON file
    seed: int = 0


@dataclass(frozen=True)
class BenchTokenWeightingConfig(Config):
    """`distilray bench token-weighting`: every variant (frozen and self scoring where both apply) extended
    from the same short-context start for the same steps, then measured in one harness."""

    artifacts_dir: str = "artifacts"
    dataset: str = "gutenberg"  # long documents: one held out for validation, one for the test
    eval_data: str = (
        ""  # another corpus for the held-out documents (prepared with the same tokenizer); "" : the test book
    )
    start_model: str = "llama-mini"  # distilray.models.rotary_lm.LLAMA_PRESETS
    start_seq_len: int = 256  # the short context the start is trained at
    start_steps: int = 300
    start_batch_size: int = 16
    seq_len: int = 1024  # the extended context
    base_length: int = 256  # b = the start's native context
    base_stride: int = 192  # (1 - b/L) b: J = L/b = 4 extra window passes per sequence, as at paper scale
    steps: int = 40  # extension steps, equal for every variant
    batch_size: int = 4
    lr: float = 3e-4
    rope_theta: float = 40_000.0  # raised with the context (the paper raises Llama-3's to 15.3M for 32k)
    variants: tuple[str, ...] = ("uniform", "dense", "sparse", "longce", "ppmi", "npmi")
    scorers: tuple[str, ...] = ("self", "frozen")
    eval_sequences: int = 8
    probe_distances: tuple[int, ...] = (64, 256, 600)
    probes_per_distance: int = 6
    timing_steps: int = 6  # optimizer steps per variant in the side-by-side timing (0: skip it)
    json_out: str = ""
    seed: int = 0


# ------------------------------------------------------------------------------------------- T-Free
TFreeDecodeScore = Literal["head", "union", "calibrated"]


@dataclass(frozen=True)
class TrigramConfig(Config):
    """The T-Free trigram hashing (reference/tfree.md 3): each byte trigram of a word goes to m of v rows,
    k of them shared with its lowercase form. The paper's best 1B setting is v=8000, m=10, k=0; v=4096 here
    keeps embedding + head 87.5% below a 32k BPE vocabulary, the paper's ratio against 64k."""

    v: int = 4096
    m: int = 8
    k: int = 2


@dataclass(frozen=True)
class TrainTFreeConfig(Config):
    """`train-tfree`: a T-Free LM (hashed trigram words in, multi-label next-word pattern out) on Ray Train,
    or, with input=token, the BPE baseline of the same backbone on the same documents and budget."""

    dataset: str = "gutenberg"  # any corpus name or path (distilray.corpus); split into documents of <= 4k chars
    data: str = ""  # a prepare-tfree folder; empty: prepare `dataset` (cached)
    instruction: bool = False  # dataset: JSONL conversations (messages, segments or question/answer), loss on
    # the answers only; fine-tunes model=DIR, a trained T-Free model whose dictionary it keeps
    input: Literal["trigram", "token"] = "trigram"  # token: the BPE baseline
    model: str = "tfree-tiny"  # distilray.models.tfree_lm.PRESETS, or a saved model folder to continue from
    trigram: TrigramConfig = field(default_factory=TrigramConfig)
    bpe_vocab_size: int = 8192  # input=token: the project's BPE trained on the dataset (cached)
    seq_len: int = 512  # positions per sample (words for T-Free, tokens for BPE)
    min_bytes: int = 0  # aligned entries' minimum size; 0: 5 bytes per position (about one English word)
    batch_size: int = 8  # global, split evenly across workers
    steps: int = 300
    pos_weight: float = 100.0  # BCE weight of the ~m*|S| positive rows among v (the 7B config: 300)
    loss_scale: float = 100.0  # the 7B config's value
    loss_normalization: Literal["real", "all"] = "real"  # real: over non-padding positions; all: the original's
    dictionary_words: int = 16_384  # decoding dictionary: the most frequent training words (+ special words)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=2e-3, min_lr_ratio=0.1, warmup_steps=30, weight_decay=0.1)
    )
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval_words: int = 4096  # held-out word positions for the final accuracy and word perplexity
    artifacts_dir: str = run_only("artifacts")
    name: str = run_only("")  # run name; empty: derived from the input, model and the config hash
    seed: int = 0


@dataclass(frozen=True)
class GenerateTFreeConfig(Config):
    """`generate-tfree`: words from a trained T-Free model by dictionary decoding, KV-cached."""

    model: str = ""  # a train-tfree model folder (required): weights, config and its dictionary/
    prompt: str = "The"
    max_words: int = 32
    decode_score: TFreeDecodeScore = "head"  # head: the released checkpoints' score; calibrated: real probabilities
    word_edge_weight: float = 1.0  # e: weight of edge-trigram rows in head/union scores (< 0.8 against artefacts)
    temperature: float = 0.0  # 0: greedy, as the original
    top_k: int = 0  # sample among the k best words (0: all)
    more_words: str = ""  # words added to the dictionary for this call; empty: the prompt's words
    seed: int = 0


@dataclass(frozen=True)
class EvalTFreeConfig(Config):
    """`eval-tfree`: fertility and vocabulary duplicates of T-Free and of any Hugging Face tokenizer, sequence
    length, and next-word accuracy and word perplexity of T-Free models and BPE baselines on held-out text."""

    models: tuple[str, ...] = ()  # train-tfree model folders (T-Free or the BPE baseline)
    tokenizers: tuple[str, ...] = ()  # more tokenizer folders for fertility and duplicates (the models' own are in)
    dataset: str = "gutenberg"  # held-out text: this corpus's `split`
    split: Literal["validation", "test"] = "test"
    eval_words: int = 4096  # reference words of held-out text
    decode_score: TFreeDecodeScore = "head"  # T-Free next-word pick (the word perplexity is always calibrated)
    json_out: str = ""


@dataclass(frozen=True)
class BenchTFreeConfig(Config):
    """`distilray bench tfree`: a T-Free model against BPE baselines of the same backbone (8k and 32k vocabularies),
    trained on the same documents for the same steps, measured in one harness."""

    artifacts_dir: str = "artifacts"
    dataset: str = "gutenberg"
    eval_data: str = ""  # another corpus for the held-out text (its test split); "": the dataset's test split
    model: str = "tfree-tiny"
    trigram: TrigramConfig = field(default_factory=TrigramConfig)
    bpe_vocab_sizes: tuple[int, ...] = (8192, 32768)
    steps: int = 600
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    eval_words: int = 4096
    json_out: str = ""
    seed: int = 0
