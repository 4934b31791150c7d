"""`distilray preprocess`: a corpus -> train.json / validation.json / test.json plus stats.json.

Each split file is a JSON list of `{"text": ...}` objects, the format `distilray.corpus` reads back
when `corpus.dataset` points at the output folder. Reading and splitting text is light work, so
this job runs in the driver and needs no ray.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from distilray.config import PreprocessConfig
from distilray.corpus import SPLITS, corpus_fingerprint, load_splits
from distilray.io_utils import atomic_write_json


def run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Write the splits of `cfg.corpus` into `cfg.output_dir`; return the paths and document counts."""
    # fingerprint first: the corpus may be this very folder, rewritten below
    fingerprint = corpus_fingerprint(cfg.corpus)
    splits = load_splits(cfg.corpus)
    out = Path(cfg.output_dir)
    files: dict[str, str] = {}
    for split in SPLITS:
        path = out / f"{split}.json"
        # indent=None: split files hold megabytes of text, and indentation only adds bytes
        atomic_write_json(path, [{"text": doc} for doc in splits[split]], indent=None)
        files[split] = str(path)

    documents = {split: len(splits[split]) for split in SPLITS}
    stats = {
        "corpus": dataclasses.asdict(cfg.corpus),
        "fingerprint": fingerprint,
        "splits": {s: {"documents": documents[s], "characters": sum(map(len, splits[s]))} for s in SPLITS},
    }
    # stats.json last, after the files it describes
    files["stats"] = str(out / "stats.json")
    atomic_write_json(files["stats"], stats)
    return {"output_dir": str(out), "files": files, "documents": documents}
