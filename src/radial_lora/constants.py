"""Names every layer agrees on, in one place that imports nothing: the config validates against them
without loading peft, transformers or diffusers, and the modules that act on them import them from here."""

from __future__ import annotations

FAMILIES = ("wan", "wan22", "hunyuan")  # models/registry.py: one adapter each
PATTERNS = ("radial", "dense")  # attention of the patched transformer (dense: the like-for-like baseline)
BACKENDS = ("auto", "flex", "sparse", "dense", "reference")  # attention/__init__.py: block_sparse_attention
TIMESTEP_SCHEMES = ("uniform", "logit_normal")  # train/flow_matching.py: sample_sigmas
EXPERTS = ("high", "low")  # Wan2.2 A14B: transformer (high noise), transformer_2 (low noise)
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # LoRA on the attention projections (the paper's recipe)
