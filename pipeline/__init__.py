"""morag-pipeline: MoRAG ingestion work on remote GPU workers."""

__version__ = "0.1.0"
