"""Readers for the source formats of the pretrained weights, and converters to safetensors.

Everything here runs once per machine (``lowkey-jax weights``) and reads downloaded data
without its original framework: no torch, TensorFlow, dlib or onnx at conversion time.
This package imports ``lowkey_jax``; ``lowkey_jax`` never imports it statically (the
weights manifest names each converter as data).
"""
