"""Decoding: the sampling loop, the retrieval augmentations that plug into it, and the generators built from them."""

from arrag.decoding.hooks import DecodeState, DecodingHook
from arrag.decoding.loop import SamplingConfig, decode_images, sample_codes
from arrag.decoding.methods import METHODS, Generator, MethodConfig, build_hooks, generate

__all__ = ["METHODS", "DecodeState", "DecodingHook", "Generator", "MethodConfig", "SamplingConfig", "build_hooks",
           "decode_images", "generate", "sample_codes"]
