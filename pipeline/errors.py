"""The failures a user can cause and fix, as one family: `python -m pipeline` prints their
message (what, which file or key, the fix) on one or two lines and exits non-zero, without
a traceback; any other exception is a bug and keeps its traceback. PIPELINE_DEBUG=1 shows
the traceback of an expected failure too."""

from __future__ import annotations


class PipelineError(Exception):
    """An expected failure: bad params, data, weights or inputs, or an unusable tracking store."""


class ArtifactError(PipelineError):
    """An input a stage reads is missing, or differs from what the stage that wrote it recorded."""


class TrackingError(PipelineError):
    """The MLflow store cannot be reached or used."""
