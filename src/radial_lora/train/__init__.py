"""LoRA length-extension training: typed config, flow-matching objective, checkpoints, the training loop."""
