"""int8 dynamic quantisation: the CPU fast path for targets and drafters.

`quantize_int8` stores the weights of every `nn.Linear` as int8 (one scale per output channel) and
quantises activations on the fly, one scale per token; the matrix products run in int8 with int32
accumulation (FBGEMM / x86 kernels, CPU only). LSTMs (drafters) use torch's dynamic int8 LSTM.
Embeddings, norms, attention and convolutions stay float32. GPT-2's projections are transformers
`Conv1D` modules (weight (in, out)), which torch's quantiser does not know, so `conv1d_to_linear`
first turns them into the equivalent `nn.Linear` (weight transposed).

A tied output head (GPT-2, the CNN/LSTM drafters) becomes an int8 copy of the embedding matrix; the
input embedding keeps its float weight, so embeddings are exact and the logits are quantised like
every other projection. Quantised layers are `Int8Linear`, whose `weight` reads as the dequantised
float matrix, so code that asks a layer its shape (the vocabulary width of the output embedding)
works unchanged. A quantised model is for inference: it is not saved, trained or re-tied.

Speculative decoding stays lossless with respect to the model served: the loop verifies against the
quantised target, so greedy output equals plain greedy decoding of that same quantised target (not of
its float32 original; `bench speculative` reports how far the two differ). That needs a token's
logits to be the same in a verification pass as in a one-token step, bit for bit: int8 rounding
turns the last-bit differences that batched float kernels make into different logits. Hence the
per-token activation scales of `Int8Linear`, and a Hugging Face LM attends row by row
(`rowwise_sdpa_attention`), which costs its prefill one attention call per prompt token and layer.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

from distilray.errors import DistilrayError

QUANTIZE_CHOICES = ("none", "int8")


class Int8Linear(nnqd.Linear):
    """An int8 Linear with per-channel int8 weights and per-token (per-row) dynamic activation scales.

    torch's dynamic Linear picks one activation scale for the whole input tensor, so a token's output
    depends on the other tokens of the pass: a verification pass over gamma + 1 tokens and a one-token
    step would disagree on the same token, and speculative decoding of the quantised model would not
    equal its plain decoding. Here every row x is divided by its own max |x| (so it lies in [-1, 1]),
    quantised with one fixed scale (7-bit, as FBGEMM's reduce_range, so no int16 saturation), multiplied
    in int8 with int32 accumulation (exact) and scaled back: each row's result depends on that row only,
    whatever the batch. `weight` reads as the dequantised (out, in) float32 matrix, as on `nn.Linear`
    (torch's own exposes a method), and a single vector (in,) is accepted.
    """

    def __init__(self, in_features: int, out_features: int, bias_: bool = True, dtype: torch.dtype = torch.qint8):
        super().__init__(in_features, out_features, bias_=bias_, dtype=dtype)
        self.register_buffer("float_bias", None)  # (out,) float32, added after rescaling

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> "Int8Linear":
        qlinear = super().from_float(mod, use_precomputed_fake_quant)
        qweight, _ = qlinear._weight_bias()
        qlinear.set_weight_bias(qweight, None)  # the kernel sees unit-scaled rows; the bias comes after rescaling
        qlinear.float_bias = None if mod.bias is None else mod.bias.detach().float().clone()
        return qlinear

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self._weight_bias()[0].dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) float32 -> (..., out) float32."""
        rows = x.reshape(-1, x.shape[-1])  # (N, in)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # (N, 1)
        y = _LINEAR_STATIC_INPUT(rows / scale, _UNIT_SCALE, _UNIT_ZERO_POINT, self._packed_params._packed_params)
        y = y * scale if self.float_bias is None else torch.addcmul(self.float_bias, y, scale)  # (N, out)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, per-token scales"


# quint8 codes 0..127 (7 bits: FBGEMM's u8 x s8 pair products cannot saturate int16) spanning [-64/63, 1]
_UNIT_SCALE, _UNIT_ZERO_POINT = 1.0 / 63.0, 64
_LINEAR_STATIC_INPUT = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers `Conv1D` (weight (in, out), y = x W + b) by the equal `nn.Linear`
    (weight (out, in)), in place, on the same device and dtype; returns the model."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, Conv1D):
                continue
            n_in, n_out = child.weight.shape
            linear = nn.Linear(
                n_in, n_out, bias=child.bias is not None, device=child.weight.device, dtype=child.weight.dtype
            )
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            linear.train(child.training)
            setattr(parent, name, linear)
    return model


ROWWISE_ATTENTION = "distilray_rowwise_sdpa"


def rowwise_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A causal self-attention whose every query row is computed by the very call a one-token step makes.

    query (B, H, q, d), key and value (B, Hkv, L, d) with the q queries at the last q of the L positions
    -> ((B, q, H, d), None). CPU attention kernels round differently with the number of query rows (a
    prefill's rows differ from later one-token steps in the last bits), and int8's rounding of
    activations can turn such a difference into a different logit; so the int8 model attends row by
    row, row i over keys [0, L - q + i], one-token steps included. A pass then gives every token the
    output a one-token step gives it, whatever the batch, at the price of q calls per layer instead of one.
    With a mask that is more than causal (batched decoding: padding, holes of rejected drafts), each
    sequence's queries attend over its own keys gathered (`_attend_allowed_keys`): B * q calls a layer,
    measured at 1.1-1.2x the speculative step of 8 rows on the 21M preset, for bit-exact rows.
    """
    if not getattr(module, "is_causal", True) or kwargs.get("position_bias") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None:  # dropped when it is the plain causal pattern (a one-token step has none)
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0  # (B, 1, q, L)
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        if bool((allowed == causal).all()):
            attention_mask = None
    gqa = {"enable_gqa": True} if query.shape[1] != key.shape[1] else {}
    if attention_mask is not None:  # batched decoding: padding and holes between a row's keys
        return _attend_allowed_keys(query, key, value, allowed, dropout, scaling, gqa), None
    rows = []
    for i in range(q_len):
        end = kv_len - q_len + i + 1
        rows.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, i : i + 1],
                key[:, :, :end],
                value[:, :, :end],
                attn_mask=None if attention_mask is None else attention_mask[:, :, i : i + 1, :end],
                dropout_p=dropout,
                scale=scaling,
                **gqa,
            )
        )  # (B, H, 1, d)
    return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None


def _attend_allowed_keys(query, key, value, allowed, dropout, scaling, gqa) -> torch.Tensor:
    """Each (row, query) over exactly the keys its mask allows, gathered first: the very call a lone
    sequence's one-token step makes (the same keys, in the same order, no mask), so batched decoding
    with padding and holes gives every token the output it gets alone (int8 rounds any difference in the
    last bits of an activation into a whole quantisation step). -> (B, q, H, d).

    The mask is causal & padding (what transformers builds from a 2D mask), so a query's allowed keys
    are a prefix of its row's real keys: one gather per row, then a prefix per query."""
    batch, heads, q_len, _ = query.shape
    allowed = allowed.expand(batch, 1, q_len, key.shape[2])[:, 0]  # (B, q, L)
    out = query.new_zeros(batch, heads, q_len, value.shape[-1])
    for b in range(batch):
        real = allowed[b].any(0).nonzero().squeeze(1)  # the row's keys, in order
        keys, values = key[b : b + 1].index_select(2, real), value[b : b + 1].index_select(2, real)
        for i, n in enumerate(allowed[b].sum(1).tolist()):
            if n == 0:  # no key at all: a padding slot nobody reads
                continue
            out[b, :, i] = torch.nn.functional.scaled_dot_product_attention(
                query[b : b + 1, :, i : i + 1],
                keys[:, :, :n],
                values[:, :, :n],
                dropout_p=dropout,
                scale=scaling,
                **gqa,
            )[0, :, 0]
    return out.transpose(1, 2).contiguous()


def _register_rowwise_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ROWWISE_ATTENTION, rowwise_sdpa_attention)
    if ROWWISE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ROWWISE_ATTENTION, sdpa_mask)  # masks built as for sdpa: None when causal


def use_rowwise_attention(model: nn.Module) -> bool:
    """Switch a Hugging Face decoder-only LM that uses sdpa or eager attention to `rowwise_sdpa_attention`,
    in place; whether it was switched (other models keep their attention)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(model, "set_attn_implementation"):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", ROWWISE_ATTENTION):
        return False
    _register_rowwise_attention()
    model.set_attn_implementation(ROWWISE_ATTENTION)
    return config._attn_implementation == ROWWISE_ATTENTION


def model_devices(model: nn.Module) -> set[str]:
    """Device types of the model's parameters and buffers ({"cpu"}, {"cuda"}, ...)."""
    return {t.device.type for t in (*model.parameters(), *model.buffers())}


def quantize_int8(model: nn.Module) -> nn.Module:
    """The model in eval mode, float32, with int8 dynamically quantised Linear and LSTM layers, in place
    (GPT-2's Conv1D projections converted first); returns the model. CPU only."""
    devices = model_devices(model)
    if devices - {"cpu"}:
        raise DistilrayError(
            f"int8 quantization runs on the CPU only (FBGEMM/x86 kernels), but the model is on "
            f"{', '.join(sorted(devices - {'cpu'}))}: load it with device=cpu, or use quantize=none"
        )
    model.eval().to(torch.float32)  # the int8 kernels take float32 activations
    conv1d_to_linear(model)
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch 2.13 marks eager-mode quantisation deprecated in favour of torchao, which is not a
        # dependency here; the API still works, and the warnings would repeat at every model load
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        quantize_dynamic(
            model,
            {nn.Linear: per_channel_dynamic_qconfig, nn.LSTM: default_dynamic_qconfig},
            mapping={nn.Linear: Int8Linear, nn.LSTM: nnqd.LSTM},
            inplace=True,
        )
    use_rowwise_attention(model)
    return model


def check_quantize_mode(mode: str) -> str:
    """The mode itself when it is one of QUANTIZE_CHOICES; a DistilrayError naming the choices otherwise."""
    if mode not in QUANTIZE_CHOICES:
        raise DistilrayError(f"unknown quantization {mode!r}; choose from {', '.join(QUANTIZE_CHOICES)}")
    return mode


def apply_quantization(model: nn.Module, mode: str) -> nn.Module:
    """`mode` "none": the model unchanged; "int8": `quantize_int8(model)` (in place, CPU only)."""
    if check_quantize_mode(mode) == "none":
        return model
    if not isinstance(model, nn.Module):
        raise DistilrayError(f"only a torch model can be quantized, not a {type(model).__name__}")
    return quantize_int8(model)


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of the model is int8 dynamically quantised."""
    return any(isinstance(m, (nnqd.Linear, nnqd.LSTM)) for m in model.modules())
