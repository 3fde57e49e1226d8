"""``hf_gauge.find_gauge``: live models, or checkpoint folders / Hub ids matched data-free straight from their files.

With two checkpoint references (folder paths or Hub ids) and no data, the gauge ``x_B = g(x_A)`` is found without
building either model: the residual similarity ``C`` is read from the safetensors shards block by block
(``hf_gauge.filefeatures``, the same features as the in-memory data-free matcher, so the same gauge), matched with
``match.match_correlation``; inner spaces (``"mlp.<i>"``, ``"attn.<i>"``) are matched one layer at a time from that
layer's tensors, with A's residual axes brought into B's chart (``inner.slices_from`` / ``inner.match_slices``, as
``inner.match_inner`` does data-free). Peak memory: the ``[d, d]`` similarity and one block, or one layer's tensors
for inner spaces; never a whole model. Live models (or ``data=``) go to ``match.find_gauge``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import torch

from .engine import check_gauge, space_sizes
from .errors import GaugeError
from .filefeatures import CheckpointFiles, layer_tensors, residual_correlation
from .gauge import Gauge, target_space
from .group import SignedPermutation
from .inner import match_slices, slices_from
from .specs import carried_last
from .match import find_gauge as find_gauge_models
from .match import match_correlation, select_families
from .modelref import model_ref
from .view import gain_fingerprint

__all__ = ["find_gauge", "find_gauge_from_files", "is_checkpoint_ref"]


def is_checkpoint_ref(x: Any) -> bool:
    """A checkpoint given by reference (folder path or Hub id) rather than as a live model."""
    return isinstance(x, (str, os.PathLike))


def find_gauge(model_a: Any, model_b: Any, data: Any = None, method: str = "signed", *args: Any, **kw: Any):
    """The gauge from ``model_a``'s residual chart to ``model_b``'s (``x_B = g(x_A)``).

    Live models: ``match.find_gauge`` (data-free from weights, or from activations with ``data``). Two checkpoint
    folders or Hub ids with ``data=None``: ``find_gauge_from_files`` (data-free, no model is built; accepts
    ``spaces``, ``low_confidence``, ``max_rows``, ``revision_a``, ``revision_b``).
    """
    ra, rb = is_checkpoint_ref(model_a), is_checkpoint_ref(model_b)
    if not (ra or rb):
        return find_gauge_models(model_a, model_b, data, method, *args, **kw)
    if not (ra and rb):
        raise GaugeError("give both models as live models or both as checkpoint folders / Hub ids, not one of each")
    if data is not None or args:
        raise GaugeError("matching from activations needs live models: load both with "
                         "AutoModelForCausalLM.from_pretrained (dtype=, device_map= for large models) and pass them; "
                         "checkpoint folders are matched data-free (data=None)")
    extra = sorted(set(kw) - {"spaces", "low_confidence", "max_rows", "revision_a", "revision_b", "hub"})
    if extra:
        raise GaugeError(f"{extra} only apply to live models; checkpoint folders accept spaces, low_confidence, "
                         "max_rows, revision_a, revision_b and hub")
    return find_gauge_from_files(model_a, model_b, method=method, **kw)


def _check_files(fa: CheckpointFiles, fb: CheckpointFiles) -> dict[str, int]:
    ca, cb = fa.config, fb.config
    if ca.model_type != cb.model_type or fa.spec is not fb.spec:
        raise GaugeError(f"different architectures: checkpoint A is {ca.model_type!r} but B is {cb.model_type!r}; a "
                         "gauge relates two checkpoints of one architecture")
    sa, sb = space_sizes(fa.spec, ca), space_sizes(fb.spec, cb)
    if sa != sb:
        diff = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))[:4]
        raise GaugeError(f"the two checkpoints have different widths or depths (e.g. spaces {diff}); a gauge relates "
                         "checkpoints of one shape")
    return sa


def _describe(files: CheckpointFiles, ref: Any, revision: str | None) -> dict[str, Any]:
    """``models.describe`` of the model the checkpoint holds, read from its files."""
    cfg = files.config
    key = files.spec.final_norm_key(files.entries)
    model_id, revision = model_ref(str(ref), revision)
    return {"model_id": model_id, "revision": revision, "model_type": cfg.model_type,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "fingerprint": gain_fingerprint(files.read(key)) if key is not None else None}


def find_gauge_from_files(a: str | os.PathLike, b: str | os.PathLike, method: str = "signed",
                          spaces: str | Sequence[str] = ("residual",), low_confidence: float = 0.05,
                          max_rows: int | None = None, revision_a: str | None = None,
                          revision_b: str | None = None, hub: dict[str, Any] | None = None) -> Gauge:
    """Data-free gauge A -> B from two checkpoint folders or Hub ids, reading only the tensors the features need.

    Same result as ``match.find_gauge(model_a, model_b, method=method, spaces=spaces)`` on the loaded models.
    Checkpoints stored in different float dtypes (an fp32 folder against a bf16 one) are compared, not refused:
    the features are float reductions, formed in the wider dtype (float64) from the exact stored values.
    ``max_rows`` must be a positive int (or None: ``features.DEFAULT_MAX_ROWS``).
    ``hub``: ``token``, ``cache_dir``, ``local_files_only``, ``endpoint`` for Hub ids.
    """
    if method not in ("signed", "permutation"):
        raise GaugeError(f"method {method!r}: matching from checkpoint files supports 'signed' and 'permutation' "
                         "(procrustes fits activations: load the models and pass data=)")
    with CheckpointFiles(a, revision=revision_a, label="checkpoint A", **(hub or {})) as fa, \
            CheckpointFiles(b, revision=revision_b, label="checkpoint B", **(hub or {})) as fb:
        sizes = _check_files(fa, fb)
        wanted = select_families(fa.spec, spaces)
        C, counts = residual_correlation(fa, fb, max_rows=max_rows)
        if counts["n_signed"] == 0 and method == "signed":
            raise GaugeError("data-free matching found no sign-carrying tensor (token embedding / lm_head) in the "
                             "architecture spec, so signs cannot be determined; load the models and pass data=")
        m = match_correlation(C, method, overwrite=True)   # C's memory becomes the cost: no fresh d×d scratch
        del C
        residual = Gauge(spaces={"residual": m.element})
        check_gauge(fa.spec, fa.config, residual)          # LayerNorm models: S_d x {±1} only
        metrics: dict[str, Any] = {"method": method, "data_free": True, "from_files": True, "n_tokens": 0,
                                   "n_signed_tensors": counts["n_signed"],
                                   "n_invariant_features": counts["n_invariant"]}
        metrics.update(m.summary(low_confidence))
        metrics["low_confidence_threshold"] = low_confidence
        confidence: dict[str, Any] = {"residual": torch.from_numpy(m.margin)}
        extra: dict[str, SignedPermutation] = {}
        label = f"data-free/{method}"
        kinds = wanted[1:]
        if kinds:
            label += "+inner"
            for i in range(int(fa.config.num_hidden_layers)):
                layer = [sp for sp in sizes if sp.split(".")[0] in kinds and sp.split(".")[1:2] == [str(i)]]
                if not layer:
                    continue
                pa, pb = layer_tensors(fa, set(layer)), layer_tensors(fb, set(layer))
                for space in carried_last(layer):                 # carriers first
                    other = target_space(space, extra)      # A's expert a is B's slot sigma^-1(a)
                    sa = slices_from(fa.spec, fa.config, space, pa, m.element, files=True)
                    sb = slices_from(fb.spec, fb.config, other, pb, None, files=True)
                    if other != space:          # B's tensors of slot k stand for A's expert a: name them so
                        sb = [dataclasses.replace(x, name=y.name) for x, y in zip(sb, sa)] if len(sb) == len(sa) else sb
                    extra[space], confidence[space] = match_slices(fa.spec, fa.config, space, sa, sb, method)
                del pa, pb
            missed = [sp for sp in sizes if sp.split(".")[0] in kinds and sp not in extra]
            if missed:
                raise GaugeError(f"spaces {missed[:4]} are not per-layer, so matching from checkpoint files cannot "
                                 "reach them; load the models and pass them to find_gauge")
        return Gauge(spaces={"residual": m.element, **extra}, source=_describe(fa, a, revision_a),
                     target=_describe(fb, b, revision_b), method=label, metrics=metrics, confidence=confidence)
