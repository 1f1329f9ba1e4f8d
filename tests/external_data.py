"""A copy of a tiny bundle whose graph keeps its weights in model.onnx_data, as every graph over 2 GB does (SD-1.5's
and SDXL's UNets): the code paths for big graphs, exercised on small ones."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path


def external_copy(bundle: Path, dst: Path, component: str = "unet") -> Path:
    """``bundle`` copied to ``dst`` with ``component``'s weights moved to model.onnx_data, re-pinned in the manifest."""
    import onnx

    from edgediff.bundle.describe import component_entry
    from edgediff.bundle.reader import Bundle
    from edgediff.bundle.writer import write_manifest

    shutil.copytree(bundle, dst)
    path = dst / component / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=1024)
    m = Bundle.open(bundle).manifest
    old = m.components[component]
    comps = dict(m.components, **{component: component_entry(dst, component, precision=old.precision,
                                                             parity=old.parity)})
    write_manifest(dst, dataclasses.replace(m, components=comps))
    return dst
