"""Dramatiq actors, grouped by the capability that runs them.

``gpu``: transcription; ``cpu``: document conversion plus every GPU actor (a
task moved to ``cpu`` runs there); ``control``: task events, run by the server.
The actors are thin: they hand the job to ``pipeline.jobs`` and report.
"""
