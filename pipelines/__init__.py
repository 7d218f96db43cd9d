"""Speculative diffusers pipelines, one per file (diffusers' convention).

Each file also works on its own as a diffusers custom pipeline
(``custom_pipeline="path/to/pipeline_xxx.py"``, ``trust_remote_code=True``).
"""

from .pipeline_speculative_ddpm import SpeculativeDDPMPipeline, SpeculativeImagePipelineOutput
from .pipeline_speculative_stable_diffusion import (
    SpeculativeStableDiffusionPipeline,
    SpeculativeStableDiffusionPipelineOutput,
)

__all__ = [
    "SpeculativeDDPMPipeline",
    "SpeculativeImagePipelineOutput",
    "SpeculativeStableDiffusionPipeline",
    "SpeculativeStableDiffusionPipelineOutput",
]
