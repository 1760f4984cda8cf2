"""What a job is: the wire schema, errors, Redis keys, settings and the numbers of InvokeAI's LoRA guidance. Imports nothing else of lorafleet."""
