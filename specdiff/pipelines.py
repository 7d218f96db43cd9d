"""The speculative diffusers pipelines, as ``specdiff.pipelines.<Name>``.

They live in the top-level ``pipelines`` package (one file per pipeline, so each file also
loads as a diffusers custom pipeline); this module re-exports them.
"""

from pipelines import (  # noqa: F401
    SpeculativeDDPMPipeline,
    SpeculativeImagePipelineOutput,
    SpeculativeStableDiffusionPipeline,
    SpeculativeStableDiffusionPipelineOutput,
)

__all__ = [
    "SpeculativeDDPMPipeline",
    "SpeculativeImagePipelineOutput",
    "SpeculativeStableDiffusionPipeline",
    "SpeculativeStableDiffusionPipelineOutput",
]
