"""LoRA files to weights: file reading, key formats, deltas, the module index, the patcher and the LoRA store."""
