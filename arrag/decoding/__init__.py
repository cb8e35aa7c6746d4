"""Decoding: the sampling loop and the retrieval augmentations that plug into it."""

from arrag.decoding.sampler import DecodingHook, generate, sample_codes

__all__ = ["DecodingHook", "generate", "sample_codes"]
