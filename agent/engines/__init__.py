"""Inference engines: one Engine base and one short module per backend."""
