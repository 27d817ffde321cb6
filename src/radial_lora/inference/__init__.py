"""Inference: generate long videos with the stock pipelines under radial attention and LoRAs."""

from radial_lora.inference.generate import GenerationResult, generate, parse_lora_spec, read_prompts

__all__ = ["GenerationResult", "generate", "parse_lora_spec", "read_prompts"]
