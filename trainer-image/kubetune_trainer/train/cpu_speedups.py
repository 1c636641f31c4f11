"""Speed-ups of training on the CPU, and only there: each leans on a private API of TRL or transformers, so they live
here together, and tests/unit/test_fused_head.py and test_packing_collator.py fail when those APIs change.

- The compact fused LM head: TRL's `add_fused_lm_head` (SFTTrainer's default loss) scores only the labelled
  positions where Triton runs and every position elsewhere, so that compilers such as Neuron's see one tile shape per
  batch. On the CPU in eager mode that buys nothing and costs a great deal: with completion-only loss a row of AG
  News has ~120 positions and ~3 labels, each projected onto a 49,152-word vocabulary
  (docs/decisions/0006-compact-lm-head-on-cpu.md). The unlabelled positions add exactly zero to the loss and its
  gradient either way; only the work changes.
- Block-diagonal packed batches: the CPU's attention has no kernel for TRL's padding-free packed row, so packed rows
  go as one [batchSize, longest row] batch attended block by block, and the trainer counts their real tokens
  (docs/decisions/0007-packing-on-cpu.md).
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kubetune_trainer.train.callbacks import WatchedSFTTrainer

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


# The collator's per-row count of real (non-pad) tokens, for the trainer's token count; the model never sees it.
REAL_TOKENS_PER_ROW = "real_tokens_per_row"
# Labels that take no part in the loss, as transformers' and TRL's losses spell it.
IGNORED_LABEL = -100


def packed_position_ids(position_ids: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The rows' position ids with each row's right pad tail numbered from 0 too, so that it is a block of its own."""
    import torch

    # transformers cuts a row into attention blocks where its position ids stop counting up by one; numbered from 0,
    # the tail starts a block, so its queries see only pad keys and no real token sees a pad key.
    tail_positions = (~real).cumsum(dim=-1) - 1
    return torch.where(real, position_ids, tail_positions)


class BlockDiagonalPackedCollator:
    """Packed rows as one right-padded [rows, longest row] batch, attended block by block: one block per packed example.

    It returns input_ids, labels, position_ids and REAL_TOKENS_PER_ROW, and no attention mask: given position ids and
    no mask (and no cache), transformers builds a block-diagonal causal mask from where the position ids restart
    (masking_utils.find_packed_sequence_indices), for any batch size. TRL's own padded collator does the padding, the
    labels (the dataset's, -100 outside completions under completion-only loss) and each example's position ids (from
    the packing's seq_lengths); the pad tail gets positions from 0 and -100 labels.
    """

    def __init__(self, pad_token_id: int) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.pad_token_id = pad_token_id
        self.padded = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, return_position_ids=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch of these packed rows."""
        batch = self.padded(examples)
        real = batch["attention_mask"].bool()
        position_ids = packed_position_ids(batch["position_ids"], real)
        # A packed example's first token would be learnt from the previous example's last one, which it cannot see
        # (TRL's padding-free collator drops the same labels); the tail starts at 0 too, and is -100 already.
        labels = batch["labels"].masked_fill(position_ids == 0, IGNORED_LABEL)
        return {
            "input_ids": batch["input_ids"],
            "labels": labels,
            "position_ids": position_ids,
            REAL_TOKENS_PER_ROW: real.sum(dim=-1),
        }


class PackedRealTokenCount:
    """Trainer mixin for BlockDiagonalPackedCollator batches: the model gets them without REAL_TOKENS_PER_ROW, and the
    trainer's token count (state.num_input_tokens_seen) adds those counts."""

    args: Any
    state: Any
    accelerator: Any

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        model_inputs = {name: value for name, value in inputs.items() if name != REAL_TOKENS_PER_ROW}
        return super().compute_loss(model, model_inputs, *args, **kwargs)  # type: ignore[misc]

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        # transformers' own count reads the attention mask, or else compares input_ids with the pad id: with no mask,
        # it would miss every EOS token of a model whose pad token is its EOS.
        if REAL_TOKENS_PER_ROW not in inputs or self.args.include_num_input_tokens_seen == "no":
            super()._track_num_input_tokens(inputs)  # type: ignore[misc]
            return
        import torch

        real = torch.as_tensor(inputs[REAL_TOKENS_PER_ROW].sum(), device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(real).sum().item())


@functools.cache
def block_diagonal_packed_sft_trainer() -> type[WatchedSFTTrainer]:
    """WatchedSFTTrainer fed by BlockDiagonalPackedCollator; made on first use, so that importing trl waits for it."""
    from kubetune_trainer.train.callbacks import WatchedSFTTrainer

    class BlockDiagonalPackedSFTTrainer(PackedRealTokenCount, WatchedSFTTrainer):
        """WatchedSFTTrainer whose packed batches are [batchSize, longest row] with block-diagonal attention."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # SFTTrainer refuses a collator of ours with bfd packing (it wants its padding-free one), so ours replaces
            # it once built, with the pad token SFTTrainer settled on; the dataloaders read data_collator at train().
            padding_free: Any = self.data_collator  # trl's DataCollatorForLanguageModeling
            self.data_collator = BlockDiagonalPackedCollator(padding_free.pad_token_id)

    return BlockDiagonalPackedSFTTrainer
