"""Swapping a running pipeline's LoRAs: compute the new weights (from the base, reusing unchanged components'),
then reopen what changed; on a failure while reopening, put the previous weights back."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .apply import AppliedLoras, apply_loras

if TYPE_CHECKING:
    from ..bundle.reader import Bundle
    from ..components import Components


def swap_loras(bundle: "Bundle", components: "Components", current: AppliedLoras | None, loras: Any) -> AppliedLoras:
    current = current or AppliedLoras()
    new = apply_loras(bundle, loras, current, verify=components.verify)  # raises before anything is touched
    try:
        components.set_weights(new.weights)
    except BaseException:
        components.set_weights(current.weights)  # the components that changed reopen with the old weights
        raise
    return new
