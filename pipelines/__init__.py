"""Speculative diffusers pipelines, one per file (diffusers' convention).

Each file also works on its own as a diffusers custom pipeline
(``custom_pipeline="path/to/pipeline_xxx.py"``, ``trust_remote_code=True``). Pipelines
with heavier dependencies (Stable Diffusion, SDXL, SD3, FLUX and text need ``transformers``) are imported on first use.
"""

from importlib import import_module

from .pipeline_speculative_ddpm import SpeculativeDDPMPipeline, SpeculativeImagePipelineOutput

_LAZY = {
    "SpeculativeStableDiffusionPipeline": "pipeline_speculative_stable_diffusion",
    "SpeculativeStableDiffusionPipelineOutput": "pipeline_speculative_stable_diffusion",
    "SpeculativeStableDiffusionXLPipeline": "pipeline_speculative_stable_diffusion_xl",
    "SpeculativeStableDiffusionXLPipelineOutput": "pipeline_speculative_stable_diffusion_xl",
    "SpeculativeStableDiffusion3Pipeline": "pipeline_speculative_stable_diffusion_3",
    "SpeculativeFluxPipeline": "pipeline_speculative_flux",
    "SpeculativeFlowPipelineOutput": "speculative_utils",
    "SpeculativeMaskedDiffusionPipeline": "pipeline_speculative_masked_diffusion",
    "MaskedDiffusionPipelineOutput": "pipeline_speculative_masked_diffusion",
    "SpeculativeScoreSdeVePipeline": "pipeline_speculative_score_sde_ve",
    "SpeculativeTextDiffusionPipeline": "pipeline_speculative_text",
    "TextDiffusionPipelineOutput": "pipeline_speculative_text",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SpeculativeDDPMPipeline", "SpeculativeImagePipelineOutput"] + list(_LAZY)
