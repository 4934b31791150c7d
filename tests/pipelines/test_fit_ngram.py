import json

import pytest

from distilray import corpus
from distilray.config import CorpusSpec, FitNGramConfig
from distilray.errors import DistilrayError
from distilray.models.ngram import NGramDrafter
from distilray.pipelines import fit_ngram
from distilray.tokenizer import encode_documents

pytestmark = pytest.mark.ray


def test_ray_data_counts_equal_one_pass_over_the_corpus(ray_session, small_tokenizer, tmp_path):
    tok, tok_dir = small_tokenizer
    spec = CorpusSpec(dataset="tinyshakespeare")
    cfg = FitNGramConfig(tokenizer=str(tok_dir), corpus=spec, n=3, num_blocks=4, output_dir=str(tmp_path / "ng"))
    stats = fit_ngram.run(cfg)
    assert stats["blocks"] == 4 and stats["n"] == 3
    fitted = NGramDrafter.load(tmp_path / "ng")
    direct = NGramDrafter(3, len(tok)).fit(encode_documents(tok, corpus.load_splits(spec)["train"]))
    assert fitted.to_rows() == direct.to_rows()
    assert stats["tokens"] == sum(len(s) for s in encode_documents(tok, corpus.load_splits(spec)["train"]))
    assert json.loads((tmp_path / "ng" / "stats.json").read_text())["contexts"] == len(direct.to_rows())


def test_fit_ngram_needs_a_tokenizer(tmp_path):
    with pytest.raises(DistilrayError, match="needs tokenizer"):
        fit_ngram.run(FitNGramConfig(output_dir=str(tmp_path)))


def test_counts_over_a_pseudo_data_set(ray_session, small_tokenizer, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok, tok_dir = small_tokenizer
    rng = np.random.default_rng(0)
    seqs = rng.integers(4, len(tok), size=(30, 20))
    folder = tmp_path / "pseudo" / "data"
    folder.mkdir(parents=True)
    for i in range(3):  # three Parquet files, as a Ray Data write leaves them
        part = seqs[i * 10 : (i + 1) * 10]
        pq.write_table(
            pa.table({"row": np.arange(i * 10, (i + 1) * 10), "tokens": list(part)}), folder / f"part-{i}.parquet"
        )
    stats = fit_ngram.run(
        FitNGramConfig(
            tokenizer=str(tok_dir), n=2, pseudo_data=str(tmp_path / "pseudo"), output_dir=str(tmp_path / "ng")
        )
    )
    direct = NGramDrafter(2, len(tok)).fit([list(map(int, s)) for s in seqs])
    assert NGramDrafter.load(tmp_path / "ng").to_rows() == direct.to_rows()
    assert stats["tokens"] == seqs.size and stats["source"].endswith("pseudo")
    with pytest.raises(DistilrayError, match="no Parquet"):
        fit_ngram.run(
            FitNGramConfig(
                tokenizer=str(tok_dir), pseudo_data=str(tmp_path / "nothing"), output_dir=str(tmp_path / "ng2")
            )
        )
