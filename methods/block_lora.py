"""Block-LoRA: "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot
Learning" (arXiv 2501.16720).

A RECONSTRUCTION FROM THE PAPER'S ABSTRACT: no method section or code was available. The abstract
says Block-LoRA partitions LoRA's low-rank matrices into blocks and shares the down-projection
sub-matrices, turning matmuls into additions, with fewer parameters and less compute than
CLIP-LoRA. Read with block-matrix algebra (../shared/METHODS.md): A = [A_s, ..., A_s] over n
contiguous input chunks, so h = W0 x + s * B A_s (x_1 + ... + x_n); merged Delta W = s * B [A_s, ..., A_s];
n = 1 is exactly LoRA. Per adapted matrix r * (d_out + d_in / n) parameters (ViT-B/16: 103,680).

Open choices, exposed as hyper-parameters: `n_blocks` (8, "eight arms"); `chunk_norm` (none | n |
sqrt_n: the chunk sum is not rescaled by default); `dropout_before_sum` (true: dropout on the input
as CLIP-LoRA); `a_init_fan_in` (block: kaiming_uniform(a=sqrt(5)) on A_s itself, fan-in d_in / n;
full: LoRA's bound, fan-in d_in). Placement (q, k, v of both encoders), rank, alpha, dropout and the
whole training recipe are CLIP-LoRA's (methods/clip_lora.py), whose loop this class reuses.
"""

from __future__ import annotations

from methods.base import register
from methods.clip_lora import CLIPLoRA
from methods.hparams import Param
from methods.lora import block_lora_factory


@register
class BlockLoRA(CLIPLoRA):
    name = "block_lora"
    paper = "One Head Eight Arms: Block Matrix based Low Rank Adaptation for CLIP-based Few-Shot Learning (arXiv 2501.16720)"
    source = "none (no official code released for arXiv 2501.16720); CLIP-LoRA's loop, MaxZanella/CLIP-LoRA@358f0d7361f5"
    deviations = (
        "RECONSTRUCTION from the abstract only (no method section or code available): shared down-projection over "
        "n input chunks; open choices exposed (n_blocks, chunk_norm, dropout_before_sum, a_init_fan_in); "
        "placement and training recipe taken from CLIP-LoRA, with CLIP-LoRA's deviations: " + CLIPLoRA.deviations
    )
    defaults = {
        **CLIPLoRA.defaults,
        "n_blocks": 8,
        "chunk_norm": "none",  # none | n | sqrt_n
        "dropout_before_sum": True,
        "a_init_fan_in": "block",  # block | full
    }
    schema = {
        **CLIPLoRA.schema,
        "n_blocks": Param(int, ge=1),
        "chunk_norm": Param(str, choices=("none", "n", "sqrt_n")),
        "dropout_before_sum": Param(bool),
        "a_init_fan_in": Param(str, choices=("block", "full")),
    }

    def make_adapter_factory(self):
        hp = self.hp
        return block_lora_factory(
            int(hp["r"]), float(hp["alpha"]), float(hp["dropout"]), n=int(hp["n_blocks"]), chunk_norm=hp["chunk_norm"],
            dropout_before_sum=bool(hp["dropout_before_sum"]), a_init_fan_in=hp["a_init_fan_in"],
        )
