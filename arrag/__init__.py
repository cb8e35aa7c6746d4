"""arrag: patch-level autoregressive retrieval augmentation (AR-RAG) for AR image generators."""

__version__ = "0.1.0"
