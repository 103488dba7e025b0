"""Dramatiq middleware of morag-pipeline, one concern per module."""
