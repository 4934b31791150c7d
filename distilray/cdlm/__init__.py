"""Chunk-distilled language modelling (CD-LM), the plain numpy/torch parts.

- `mining`: high-confidence runs in scored windows -> `Phrase` records (entry token + chunk).
- `trie`: `ChunkTrie`, the token trie that groups phrases by entry token and shares identical ones.
- `perplexity_dp`: similarity -> switch-probability maps and the backward dynamic program that gives
  the likelihood of a reference text under CD-LM.

Nothing here imports ray; the Ray actors and pipelines build on these modules.
"""
