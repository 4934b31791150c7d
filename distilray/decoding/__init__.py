"""Pure decoding algorithms (no ray): speculative sampling, chunk retrieval decoding, MDLM sampler, T-Free decode."""
