"""T-Free's input and output sides used from plain transformers code: the README's example, run."""

import torch
from transformers import LlamaConfig, LlamaModel

from distilray.losses.tfree import tfree_bce
from distilray.tfree.embedding import TrigramEmbedding, TrigramTokenizer
from distilray.tfree.hashing import TrigramVocab, hasher_for


def test_readme_example_trains_a_llama_body_on_trigram_words():
    torch.manual_seed(0)
    vocab = TrigramVocab(v=4096, m=8, k=2)
    tok = TrigramTokenizer(vocab)
    embed = TrigramEmbedding(vocab, 128)  # replaces the token embedding
    body = LlamaModel(
        LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4, vocab_size=1)
    )
    head = torch.nn.Linear(128, vocab.v, bias=False)  # predicts the next word's trigram rows

    words, mask = tok.pad([tok.encode("Hello world, hello T-Free."), tok.encode("Words, not tokens.")])
    inputs, nexts = [w[:-1] for w in words], [w[1:] for w in words]
    hidden = body(inputs_embeds=embed(inputs), attention_mask=mask[:, :-1].long()).last_hidden_state
    loss = tfree_bce(head(hidden), tok.targets(nexts), mask[:, 1:].float(), pos_weight=100.0, loss_scale=1.0)
    loss.backward()
    assert loss.item() > 0 and embed.bag.weight.grad.abs().sum() > 0
    assert tok.decode(tok.encode("Hello world, hello T-Free.")) == "Hello world, hello T-Free."
    # a word's vector is the sum of its trigrams' rows, repeats counted
    vector = embed([["Hello"]])[0, 0]
    rows = torch.from_numpy(hasher_for(vocab).word_rows("Hello"))
    assert torch.allclose(vector, embed.bag.weight[rows].sum(0), atol=1e-6)
