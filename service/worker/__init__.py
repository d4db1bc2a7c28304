"""The GPU side: the worker loop, batcher, model runner, diffusers pipeline, UNet backends, artifacts."""
