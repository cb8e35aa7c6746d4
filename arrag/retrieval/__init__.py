"""Retrieval: the neighbourhood definition, the code store, the FAISS index and the patch retriever."""

from arrag.retrieval.neighborhood import SHAPES, get_neighborhood, key_vectors, keys_for_grid, valid_mask
from arrag.retrieval.retriever import PatchRetriever

__all__ = ["SHAPES", "PatchRetriever", "get_neighborhood", "key_vectors", "keys_for_grid", "valid_mask"]
