"""Training losses. `distillation`: divergences between teacher (target) and student (drafter)
next-token distributions given as logits, plus the mixed KD + cross-entropy objective."""
