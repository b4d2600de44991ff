"""Pretrained networks ported to Flax NNX, one model per file."""
