"""DeepCache's rows of the exporter's component table (Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for
Free", CVPR 2024): ``edgediff export SRC OUT --deepcache B[,B...]`` derives from the same UNet weights

- ``unet_deepcache_full``: the whole UNet (its noise prediction is the plain ``unet`` graph's), which also outputs
  ``deep_feature_<B>`` for each branch B: the feature the shallow graph will be handed on the steps in between;
- ``unet_deepcache_shallow_<B>``: (sample, timestep, encoder_hidden_states, deep_feature) -> noise prediction,
  computing only the layers DeepCache's reference implementation recomputes on a cached step.

Which layers those are is read off the reference (pip ``DeepCache==0.1.1``, ``DeepCacheSDHelper``): branch id B is
(block, layer) = divmod(B, 3); on a cached step every module below that point returns its output of the last full
step. So the shallow graph runs the time embedding, conv_in, down blocks ``0 .. block-1``, the first ``layer``
resnet(+attention) layers of down block ``block``, then -- from the cached feature -- the last ``layer + 1`` layers
of the matching up block (and its upsampler), every up block after it and the output head. Its skip connections all
come from layers it computed itself (up layer j of that block reads down layer j-1's output, fresh for j <= layer),
and the feature is the hidden state entering the first up layer it runs: the previous up layer's output (the up
block's attention or resnet), or, when the whole up block runs, the previous up block's (the mid block's for the
deepest branch). The mid block never runs on a cached step, so any branch saves at least it.

The graphs take the plan's ``unet`` row's inputs (SD's three; SDXL's ``text_embeds`` and ``time_ids``, the added
conditioning; an LCM's ``timestep_cond``, the guidance embedding) and the shallow one the feature after them.
Other UNet kinds (class labels, projected or image conditioning) are refused by name.
"""
from __future__ import annotations

from edgediff.bundle.schema import DEEPCACHE_FULL, DEEPCACHE_MAX_BRANCHES, deepcache_shallow
from edgediff.deepcache import FEATURE_INPUT, branch_position, feature_output
from edgediff.errors import ExportError

from .components import ComponentExport, Geometry


def parse_branches(spec, unet_config: dict) -> tuple[int, ...]:
    """``--deepcache`` "0" / "0,3" / (0, 3) -> sorted branch ids the UNet has, or ExportError naming the bad one."""
    items = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    blocks = len(unet_config.get("down_block_types", ()))
    out = set()
    for item in items:
        try:
            b = int(item)
        except (TypeError, ValueError):
            raise ExportError(f"--deepcache {spec}: {item!r} is not a branch id (whole numbers, comma-separated, "
                              "e.g. --deepcache 0 or 0,3)") from None
        if not 0 <= b < min(3 * blocks, DEEPCACHE_MAX_BRANCHES):
            raise ExportError(f"--deepcache branch {b}: this UNet has {blocks} down blocks, so branch ids 0 to "
                              f"{3 * blocks - 1} (3 x block + layer; 0 caches the most and is the fastest)")
        out.add(b)
    if not out:
        raise ExportError("--deepcache needs at least one branch id, e.g. --deepcache 0")
    return tuple(sorted(out))


def check_unet(unet_config: dict) -> None:
    """The UNets the shallow forward below reproduces: SD 1.x/2.x's, SDXL's (added text/time embedding) and LCM's
    (guidance embedding)."""
    kind = unet_config.get("addition_embed_type")
    if kind not in (None, "text_time"):
        raise ExportError(f"--deepcache supports SD 1.x/2.x, SDXL and LCM UNets; this one sets addition_embed_type="
                          f"{kind!r}, not wired")
    for key in ("class_embed_type", "encoder_hid_dim"):
        if unet_config.get(key):
            raise ExportError(f"--deepcache supports SD 1.x/2.x, SDXL and LCM UNets; this one sets {key}="
                              f"{unet_config.get(key)!r} (class-conditioned or projected text input), not wired")


def _up_plan(unet, branch: int) -> tuple[int, int, int]:
    """(block, up block index u, first up resnet index k0 the shallow graph runs) of a branch."""
    block, layer = branch_position(branch)
    u = len(unet.up_blocks) - 1 - block
    last = len(unet.up_blocks[u].resnets) - 1  # up layers are counted from the skip end: reversed index last - k
    # a layer id past the block's layers runs all of them (the reference's extra down layers feed only cached ones)
    return block, u, last - min(layer, last)


def _feature_module(unet, branch: int):
    """(module, tuple output?) whose output is the branch's cached feature in the full forward."""
    _, u, k0 = _up_plan(unet, branch)
    up = unet.up_blocks[u]
    if k0 > 0:
        attns = getattr(up, "attentions", None)
        return (attns[k0 - 1], True) if attns else (up.resnets[k0 - 1], False)
    return (unet.up_blocks[u - 1], False) if u > 0 else (unet.mid_block, False)


def _conditioning(names: tuple[str, ...], args: tuple) -> tuple:
    """(timestep_cond, added_cond_kwargs) from the row's inputs after the first three (by name)."""
    extra = dict(zip(names, args))
    timestep_cond = extra.pop("timestep_cond", None)  # LCM's guidance embedding (components_lcm.py)
    return timestep_cond, (extra or None)  # SDXL's text_embeds, time_ids


def _modules():
    import torch

    class DeepCacheFull(torch.nn.Module):
        """The plain UNet forward, plus each branch's feature taken by a forward hook (removed after the call)."""

        def __init__(self, m, branches, extra: tuple[str, ...] = ()):
            super().__init__()
            self.m = m
            self.branches = tuple(branches)
            self.extra = extra  # names of the inputs after the first three

        def forward(self, sample, timestep, encoder_hidden_states, *more):
            timestep_cond, added = _conditioning(self.extra, more)
            got, hooks = {}, []
            for b in self.branches:
                mod, first = _feature_module(self.m, b)

                def keep(_mod, _args, out, b=b, first=first):
                    got[b] = out[0] if first else out

                hooks.append(mod.register_forward_hook(keep))
            try:
                eps = self.m(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             timestep_cond=timestep_cond, added_cond_kwargs=added, return_dict=False)[0]
            finally:
                for h in hooks:
                    h.remove()
            return (eps, *(got[b] for b in self.branches))

    class DeepCacheShallow(torch.nn.Module):
        """The layers a cached step recomputes (module docstring), in UNet2DConditionModel.forward's order and calls
        (diffusers 0.42: no masks, no cross_attention_kwargs, default upsampling as at the plain UNet's trace)."""

        def __init__(self, m, branch, extra: tuple[str, ...] = ()):
            super().__init__()
            self.m = m
            self.block, self.u, self.k0 = _up_plan(m, branch)
            self.extra = extra

        def forward(self, sample, timestep, encoder_hidden_states, *more):
            *more, deep_feature = more
            timestep_cond, added = _conditioning(self.extra, tuple(more))
            unet = self.m
            if unet.config.center_input_sample:
                sample = 2 * sample - 1.0
            emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
            aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added or {})
            if aug is not None:  # SDXL: the pooled text and time ids' embedding
                emb = emb + aug
            if unet.time_embed_act is not None:
                emb = unet.time_embed_act(emb)
            ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                     added_cond_kwargs=added)
            h = unet.conv_in(sample)
            res = (h,)
            cross = False  # whether any layer run reads the text (SDXL's branch 0 runs none: UpBlock2D only)
            for blk in unet.down_blocks[:self.block]:
                if getattr(blk, "has_cross_attention", False):
                    h, r = blk(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
                    cross = True
                else:
                    h, r = blk(hidden_states=h, temb=emb)
                res += r
            down, up = unet.down_blocks[self.block], unet.up_blocks[self.u]
            runs = len(up.resnets) - self.k0  # up layers run = down layers (+ the block's input) they read
            for j in range(runs - 1):  # down block `block`'s first layers: the skip inputs of the up layers run
                h = down.resnets[j](h, emb)
                if getattr(down, "attentions", None):
                    h = down.attentions[j](h, encoder_hidden_states=ehs, return_dict=False)[0]
                    cross = True
                res += (h,)
            group, res = res[-runs:], res[:-runs]
            h = deep_feature
            for k in range(self.k0, len(up.resnets)):  # CrossAttnUpBlock2D / UpBlock2D.forward from layer k0
                h = torch.cat([h, group[-1]], dim=1)
                group = group[:-1]
                h = up.resnets[k](h, emb)
                if getattr(up, "attentions", None):
                    h = up.attentions[k](h, encoder_hidden_states=ehs, return_dict=False)[0]
                    cross = True
            for us in up.upsamplers or ():
                h = us(h, None)
            for blk in unet.up_blocks[self.u + 1:]:
                r, res = res[-len(blk.resnets):], res[:-len(blk.resnets)]
                if getattr(blk, "has_cross_attention", False):
                    h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=r, encoder_hidden_states=ehs,
                            upsample_size=None)
                    cross = True
                else:
                    h = blk(hidden_states=h, temb=emb, res_hidden_states_tuple=r, upsample_size=None)
            if unet.conv_norm_out:
                h = unet.conv_act(unet.conv_norm_out(h))
            out = unet.conv_out(h)
            if not cross:  # keep encoder_hidden_states a graph input (torch.onnx drops unused ones) so every
                # shallow graph takes the unet's inputs: + the sum of an empty slice, exactly 0.0
                out = out + encoder_hidden_states[:, :0].sum()
            return out

    return DeepCacheFull, DeepCacheShallow


def deepcache_rows(branches: tuple[int, ...], unet_row: ComponentExport) -> dict[str, ComponentExport]:
    """The full graph (with every branch's feature) and one shallow graph per branch, taking ``unet_row``'s inputs
    (the plan's own UNet row: SD's, SDXL's or an LCM's) with its axes and random inputs."""
    import torch

    Full, Shallow = _modules()
    names, extra = unet_row.input_names, unet_row.input_names[3:]

    def shallow_inputs(b):
        def inputs(c, g: Geometry, gen):  # the feature a full call really makes on those inputs, not noise
            base = unet_row.inputs(c, g, gen)
            with torch.no_grad():
                feature = Full(c["unet"], (b,), extra)(*base)[1]  # (B, C_b, h_b, w_b) float32
            return (*base, feature)
        return inputs

    axes = {k: v for k, v in unet_row.dynamic_axes.items() if k in names or k == "out_sample"}
    feats = tuple(feature_output(b) for b in branches)
    rows = {DEEPCACHE_FULL: ComponentExport(
        DEEPCACHE_FULL, names, ("out_sample", *feats),
        {**axes, **{f: {0: "batch", 2: f"{f}_height", 3: f"{f}_width"} for f in feats}},
        lambda c: Full(c["unet"], branches, extra), unet_row.inputs,
    )}
    for b in branches:
        name = deepcache_shallow(b)
        rows[name] = ComponentExport(
            name, (*names, FEATURE_INPUT), ("out_sample",),
            {**axes, FEATURE_INPUT: {0: "batch", 2: "feature_height", 3: "feature_width"}},
            lambda c, b=b: Shallow(c["unet"], b, extra), shallow_inputs(b),
        )
    return rows
