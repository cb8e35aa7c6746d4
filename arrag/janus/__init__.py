"""Our own Janus-Pro generation model: config, Llama decoder, model with the original key layout, prompts."""

from arrag.janus.config import JanusConfig, LlamaConfig
from arrag.janus.model import JanusPro
from arrag.janus.prompting import Prompter

__all__ = ["JanusConfig", "JanusPro", "LlamaConfig", "Prompter"]
