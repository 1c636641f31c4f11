"""TRL's fused LM head projects only the positions that carry a label, on the CPU as on CUDA.

trl 1.16's `add_fused_lm_head` (SFTTrainer's default loss) scores only the labelled positions where Triton runs and
every position elsewhere, so that compilers such as Neuron's see one tile shape per batch. On the CPU in eager mode
that buys nothing and costs a great deal: with completion-only loss a row of AG News has ~120 positions and ~3
labels, and py-spy put the head's forward and backward at 41% of a SmolLM2 qLoRA step (every position through a
49,152-word vocabulary, tile by tile). The positions without a label contribute exactly zero to the loss and its
gradient either way; only the work changes.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Devices that run eagerly: a batch-dependent number of scored positions costs nothing there. XLA-style devices
# (Neuron, TPU) keep TRL's fixed shapes, which spare them a recompilation per batch.
EAGER_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps"})


def compact_on_eager_devices(device: Any) -> bool:
    """Whether the fused head should score only the labelled positions on this torch device."""
    return getattr(device, "type", None) in EAGER_DEVICE_TYPES


def score_labelled_positions_only() -> bool:
    """Point TRL's choice of compact scoring at compact_on_eager_devices; False (and a warning) when TRL changed.

    TRL's fused forward asks `trl.trainer.utils._use_triton(device)` whether to compact, and nothing else in that
    module asks it; the kernel's own choice between Triton and torch tiles reads its own module's function and is
    left alone. A TRL without that name gets no patch (training is correct, only slower on the CPU).
    """
    import trl.trainer.utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)):
        log.warning("trl %s: cannot make the fused LM head compact on the CPU; training is slower there", trl_version())
        return False
    trl_utils._use_triton = compact_on_eager_devices
    return True


def trl_version() -> str:
    import trl

    return str(getattr(trl, "__version__", "unknown"))
