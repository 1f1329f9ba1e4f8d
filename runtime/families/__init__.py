"""Per-family pieces of the pipeline, picked by the manifest's ``family`` when a bundle is loaded: a new family is
an entry here, not a branch in the denoising loop."""
from __future__ import annotations

from typing import Callable

from ..bundle.reader import Bundle
from ..conditioning import TextConditioner
from ..errors import BundleError
from .flux import FluxTextConditioner
from .lcm import LcmTextConditioner, check_guidance_input
from .sd import SdTextConditioner
from .sd3 import Sd3TextConditioner
from .sdxl import SdxlTextConditioner

# family -> factory of its text conditioner
CONDITIONERS: dict[str, Callable[[Bundle], TextConditioner]] = {
    "sd1": SdTextConditioner,
    "sd2": SdTextConditioner,
    "sd2-v": SdTextConditioner,
    "sd-turbo": SdTextConditioner,  # SD 2.1 architecture, distilled for 1-4 steps
    "sdxl": SdxlTextConditioner,
    "sdxl-turbo": SdxlTextConditioner,
    "sdxl-refiner": SdxlTextConditioner,
    "sd3": Sd3TextConditioner,  # SD 3 / 3.5: CLIP-L + OpenCLIP-G + optional T5, an MMDiT transformer
    "lcm": LcmTextConditioner,  # SD 1.x/2.x + the guidance embedding (Latent Consistency Models)
    "flux": FluxTextConditioner,  # FLUX.1 schnell/dev: CLIP pooled + T5, a packed-latent flow transformer
}
SUPPORTED_FAMILIES = tuple(CONDITIONERS)


def text_conditioner(bundle: Bundle) -> TextConditioner:
    family = bundle.manifest.family
    try:
        factory = CONDITIONERS[family]
    except KeyError:
        raise BundleError(f"{bundle.root}: family {family!r} is not supported by this runtime yet "
                          f"(supported: {', '.join(SUPPORTED_FAMILIES)})") from None
    check_guidance_input(bundle)  # an LCM UNet in another family's bundle: refused, not run without its input
    return factory(bundle)
