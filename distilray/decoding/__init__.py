"""Pure decoding algorithms (no ray): speculative sampling, chunk retrieval decoding, MDLM sampler, T-Free decode.

One core shared by the autoregressive decoders: `sampling` (SamplingParams, warp, the acceptance rule),
`cached_model` (a model with its KV cache and the one crop), `drafter_api` (the Drafter protocol) and
`speculative` (the loop). `retrieval` runs CD-LM's `verify` mode through that loop with the
`chunk_drafter`; `drafters` holds the decoding-time drafters (Hugging Face LMs, any saved folder).
"""
