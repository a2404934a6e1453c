"""Models and generation: the store, the engines, and the per-device batching loop."""
