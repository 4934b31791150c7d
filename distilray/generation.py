"""Plain sampling from a causal LM (the reference every faster decoder is compared with)."""

from __future__ import annotations

import torch

from distilray.errors import DistilrayError
from distilray.models.causal_lm import max_context


@torch.no_grad()
def generate_text(
    model, tokenizer, prompt: str, max_new_tokens: int = 40, temperature: float = 0.0, top_k: int = 0, seed: int = 0
) -> str:
    """Continue `prompt` with the model's KV cache; temperature 0 is greedy."""
    if max_new_tokens < 0:
        raise DistilrayError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.size(1) == 0:
        ids = torch.tensor([[tokenizer.bos_token_id]])
    if ids.size(1) + max_new_tokens > max_context(model):
        raise DistilrayError(
            f"prompt ({ids.size(1)} tokens) + max_new_tokens exceeds the model's context {max_context(model)}"
        )
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out = model.generate(
        ids.to(device),
        attention_mask=torch.ones_like(ids).to(device),
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=top_k if temperature > 0 and top_k else None,
        top_p=None,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.size(1) :], skip_special_tokens=True)


@torch.no_grad()
def sample_continuations(
    model, prompts: torch.Tensor, new_tokens: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Batched ancestral sampling of fixed length (no early stop at EOS). prompts (B, P) -> (B, P + new_tokens).

    Hugging Face models decode with their KV cache; other networks (CNN, LSTM drafters: input_ids
    (B, T) -> logits (B, T, V)) are re-run on the whole prefix, cheap at drafter sizes. Used for
    distillation data: target generations (pseudo-data) and drafter samples (on-policy).
    """
    if temperature <= 0:
        raise DistilrayError(f"sampling temperature must be > 0, got {temperature}")
    device = next(model.parameters()).device
    seq = prompts.to(device)
    hf = hasattr(model, "config") and hasattr(model.config, "model_type")
    cache, fresh = None, seq
    for _ in range(new_tokens):
        if hf:
            out = model(input_ids=fresh, past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1]
        else:
            logits = model(seq)[:, -1]  # (B, V)
        probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
        nxt = torch.multinomial(probs, 1, generator=generator).to(device)  # (B, 1)
        seq = torch.cat([seq, nxt], dim=1)
        fresh = nxt
    return seq.cpu()
