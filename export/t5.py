"""What SD3 and FLUX export alike for their T5 text tower (diffusers' T5EncoderModel) and their folders' configs:
the wrapper that returns the last hidden state, the token-length option's check, and a component's config.json."""
from __future__ import annotations

from pathlib import Path

from edgediff.config import read_json
from edgediff.errors import ConfigError, ExportError

T5_LIMIT = 512  # StableDiffusion3Pipeline and FluxPipeline refuse max_sequence_length above this


def t5_encoder_module():
    """The export wrapper class: T5EncoderModel -> last_hidden_state (B, L, d_model); torch imported on use."""
    import torch

    class T5Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids.long(), return_dict=True).last_hidden_state

    return T5Encoder


def check_max_sequence_length(n, *, pipeline: str) -> int:
    """``--max-sequence-length``: an integer 1..512 (``pipeline`` says what the family's diffusers pipeline takes)."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= T5_LIMIT:
        raise ExportError(f"--max-sequence-length {n!r}: expected an integer from 1 to {T5_LIMIT} (T5's token "
                          f"length; {pipeline})")
    return n


def component_config(root: Path, folder: str) -> dict:
    """``root/folder/config.json`` as read (one line naming the file if it is missing or not JSON)."""
    try:
        return read_json(root / folder / "config.json", what=f"{folder}/config.json")
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
