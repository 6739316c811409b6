"""Reusable diffusion pieces: SDEs, their samplers and the EMA of weights (more modules live next to these).

The text-to-image layer is imported from its modules (they keep diffusers and transformers out of this import):
:mod:`anomgen.diffusion.text2image` (the stack: load, tiny, training step, memory settings) and
:mod:`anomgen.diffusion.textual_inversion` (placeholder concepts trained in the token table)."""

from anomgen.diffusion.ema import EMA
from anomgen.diffusion.sde import (
    SDE,
    VESDE,
    VPSDE,
    dsm_loss,
    make_sde,
    score_fn_from_unet,
    score_unet,
    tiny_score_unet,
)
from anomgen.diffusion.sde_sampling import (
    euler_maruyama_predictor_step,
    euler_maruyama_sample,
    langevin_corrector_step,
    pc_sample,
    reverse_diffusion_predictor_step,
)

__all__ = [
    "EMA",
    "SDE",
    "VESDE",
    "VPSDE",
    "dsm_loss",
    "euler_maruyama_predictor_step",
    "euler_maruyama_sample",
    "langevin_corrector_step",
    "make_sde",
    "pc_sample",
    "reverse_diffusion_predictor_step",
    "score_fn_from_unet",
    "score_unet",
    "tiny_score_unet",
]
