"""arrag: patch-level autoregressive retrieval augmentation (AR-RAG) for AR image generators."""

__version__ = "0.2.0"
