"""What a job can name: models, checkpoints, LoRAs, embeddings and VAEs, from drop folders and the shared registry."""
