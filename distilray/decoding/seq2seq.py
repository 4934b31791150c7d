"""Encoder-decoder pieces of speculative decoding (reference/speculative.md 1: FLAN-T5 targets).

The encoder runs once per request; drafting and verification extend the decoder sequence only. A
seq2seq model's forward then takes `encoder_outputs` (computed here once) and `decoder_input_ids`,
and its cache is an `EncoderDecoderCache`: the self-attention half grows with the decoder tokens
and is what `crop` shortens on a rollback; the cross-attention half (keys and values of the
encoder states) is computed on the first decoder pass and never changes.

Plain torch: `cached_model.CachedModel` (the target and the HF drafters) builds on these.
"""

from __future__ import annotations

import torch

from distilray.errors import DistilrayError


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def check_encoder_ids(model, encoder_ids: list[int] | None, who: str = "target") -> None:
    """Encoder ids are required by an encoder-decoder model and refused by a decoder-only one."""
    if is_encoder_decoder(model):
        if encoder_ids is None:
            raise DistilrayError(
                f"the {who} is an encoder-decoder model: pass encoder_ids (the source text's token ids)"
            )
        if len(encoder_ids) == 0:
            raise DistilrayError("encoder_ids is empty: the encoder needs at least one token")
        vocab = int(model.get_input_embeddings().num_embeddings)
        bad = [t for t in encoder_ids if not 0 <= int(t) < vocab]
        if bad:
            raise DistilrayError(f"encoder token id {bad[0]} is outside the model's vocabulary of {vocab}")
    elif encoder_ids is not None:
        raise DistilrayError(
            f"encoder_ids were given but the {who} is a decoder-only (causal) model; put the text in the prompt"
        )


@torch.inference_mode()
def run_encoder(model, encoder_ids: list[int]):
    """One encoder pass over encoder_ids (S,): a BaseModelOutput whose last_hidden_state is (1, S, d_model)."""
    device = next(model.parameters()).device
    ids = torch.tensor([[int(t) for t in encoder_ids]], dtype=torch.long, device=device)  # (1, S)
    return model.get_encoder()(input_ids=ids)


def decoder_forward(model, encoder_outputs, decoder_ids: torch.Tensor, cache, output_hidden_states: bool = False):
    """Decoder tokens (1, n) after the cached ones -> model output (logits (1, n, V), past_key_values,
    and decoder_hidden_states when asked for)."""
    return model(
        encoder_outputs=encoder_outputs,
        decoder_input_ids=decoder_ids,
        past_key_values=cache,
        use_cache=True,
        output_hidden_states=output_hidden_states,
    )
