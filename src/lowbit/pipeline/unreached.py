"""Towers that calibration does not reach: what happens to their quantizers.

A family's adapter declares the submodules that text-only calibration never runs
(:func:`lowbit.adapters.facts.unreached_modules`: the vision tower and the multimodal
projector of Gemma-3's multimodal class), each with a one-line reason. The rule is about
*data*, not about the declaration alone:

* a static activation (or KV-cache) quantizer in such a module whose calibrator saw no data
  once ``forward_loop`` has run is not an error: the module it belongs to goes back to float
  (its class and weight as before the swap; a KV-cache quantizer is removed), and coverage
  lists its weight with kind ``"unreached"`` and the adapter's reason;
* a module there that got data (a ``forward_loop`` that feeds images) is calibrated and
  quantized like any other, so the user includes a tower by feeding it;
* a module there without static activation quantizers (weight-only recipes, with or without
  algorithm steps: those run on the decoder blocks only) keeps its weights quantized without
  data (round to nearest); ``report.unreached`` says so for each declared tower;
* a starving quantizer anywhere else is still a :class:`~lowbit.errors.CalibrationError`.

KV-cache quantizers belong to the decoder's attention only: those the swap attached to other
attention modules (the vision encoder's) are removed before calibration and listed in
``report.kv_cache_skipped`` (:func:`kv_outside_decoder`).
"""

from __future__ import annotations

import warnings

from torch import nn

from lowbit.nn.modules import QuantMixin
from lowbit.nn.quantizer import TensorQuantizer

_KV = ("k_cache_quantizer", "v_cache_quantizer", "k_cache_quantizer_fallback",
       "v_cache_quantizer_fallback")


def declared(model: nn.Module) -> list[tuple[str, str]]:
    """``[(module path, reason)]`` that ``model``'s adapter declares unreached (present in it)."""
    from lowbit.adapters import facts

    return facts.unreached_modules(model)


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module, str]]:
    """id(quantizer) -> (owner module name, owner module, attribute name)."""
    out = {}
    for name, mod in model.named_modules():
        for cname, child in mod.named_children():
            if isinstance(child, TensorQuantizer):
                out[id(child)] = (name, mod, cname)
    return out


def starving(model: nn.Module, todo: list) -> dict[int, tuple[str, nn.Module, str, str, str]]:
    """Quantizers of ``todo`` that are calibrating, saw no data, and sit in a declared
    unreached module: ``{id(q): (owner name, owner, attribute, tower path, reason)}``."""
    towers = declared(model)
    if not towers:
        return {}
    owners = _owners(model)
    out = {}
    for q in todo:
        cal = q.calibrator
        if q.mode != "calibrating" or cal is None or getattr(cal, "n_batches", 1) != 0:
            continue
        own = owners.get(id(q))
        if own is None:
            continue
        hit = next(((p, r) for p, r in towers if _under(own[0], p)), None)
        if hit is not None:
            out[id(q)] = (*own, *hit)
    return out


def _float_class(m: nn.Module) -> type:
    return next(c for c in type(m).__mro__
                if issubclass(c, nn.Module) and not issubclass(c, QuantMixin))


def unswap(m: nn.Module) -> None:
    """Make the quantized module ``m`` its float class again (the parameters are the same
    objects; the three quantizers and the weight cache are removed)."""
    for attr in ("input_quantizer", "weight_quantizer", "output_quantizer"):
        q = m._modules.pop(attr, None)
        if q is not None:
            q.calibrator = None
            q.disable()
    for attr in ("_wq_cache", "_wq_key"):
        m.__dict__.pop(attr, None)
    m.__class__ = _float_class(m)


def release(model: nn.Module, found: dict) -> list[dict]:
    """Put the owners of the ``found`` quantizers (:func:`starving`) back to float (a
    KV-cache quantizer: removed from its attention module); returns one row per module:
    ``{name, tower, reason, action}``."""
    rows, done = [], set()
    for _, (name, mod, attr, tower, reason) in found.items():
        if attr in _KV:
            q = mod._modules.pop(attr, None)
            if q is not None:
                q.calibrator = None
                q.disable()  # a projection hook may still hold it: it passes through
            key = (name, "kv")
            action = "KV-cache quantizers removed (no calibration data)"
        else:
            key = (name, "module")
            if key in done or not isinstance(mod, QuantMixin):
                continue
            unswap(mod)
            action = "left in float: its static activation quantizers saw no calibration data"
        if key not in done:
            done.add(key)
            rows.append({"name": name, "tower": tower, "reason": reason, "action": action})
    if rows:
        towers = sorted({r["tower"] for r in rows})
        warnings.warn(f"calibration did not reach {', '.join(towers)} (declared by the "
                      f"model's adapter: {rows[0]['reason']}): {len(rows)} module(s) there "
                      "left in float; feed that tower in forward_loop to quantize it "
                      "(model.lowbit_report.unreached)", stacklevel=3)
    return rows


def kv_outside_decoder(model: nn.Module, report) -> list[str]:
    """Remove the KV-cache quantizers that the swap attached to attention modules outside
    the decoder blocks the adapter declares (:func:`lowbit.adapters.facts.attention_modules`:
    a vision encoder's attention keeps no KV cache); returns their names, also kept in
    ``report.kv_cache_skipped``. Nothing changes for a model whose adapter declares no
    attention modules (the generic one)."""
    from lowbit.adapters import facts

    if not report.kv_cache:
        return []
    declared_attn = {n for n, _ in facts.attention_modules(model)}
    if not declared_attn:
        return []
    mods = dict(model.named_modules())
    gone = []
    for name, _ in report.kv_cache:
        if name in declared_attn:
            continue
        for attr in _KV:
            q = mods[name]._modules.pop(attr, None)
            if q is not None:
                q.disable()  # a projection hook may still hold it: it passes through
        gone.append(name)
    report.kv_cache = [kv for kv in report.kv_cache if kv[0] not in gone]
    report.kv_cache_skipped = [
        (n, "not a decoder attention of the model's adapter: it keeps no KV cache")
        for n in gone]
    return gone


def update_report(model: nn.Module, report, recipe, rows: list[dict]) -> None:
    """Record ``rows`` (:func:`release`) in ``report.unreached`` with a row per declared tower
    that keeps quantized weights without data, drop released modules from
    ``report.quantized``/``kv_cache``, and recompute ``report.coverage``: the weights of
    released modules get kind ``"unreached"`` and the adapter's reason."""
    from lowbit.adapters import family
    from lowbit.nn.coverage import weight_coverage

    towers = declared(model)
    if not towers:
        return
    fam = family(model)
    gone = {r["name"] for r in rows if not r["action"].startswith("KV")}
    kv_gone = {r["name"] for r in rows if r["action"].startswith("KV")}
    out = list(rows)
    for path, reason in towers:
        kept = [n for n, m in model.named_modules() if _under(n, path)
                and isinstance(m, QuantMixin) and m.weight_quantizer.spec is not None]
        if kept:
            out.append({"name": path, "tower": path, "reason": reason,
                        "action": f"{len(kept)} module(s) with quantized weights (no "
                                  "activation data needed: round to nearest, outside the "
                                  "decoder blocks that algorithm steps run on)"})
    report.unreached = out
    if not gone and not kv_gone:
        return
    report.quantized = [n for n in report.quantized if n not in gone]
    report.kv_cache = [kv for kv in report.kv_cache if kv[0] not in kv_gone]
    old = report.coverage
    cov = weight_coverage(model, recipe, targets_all=bool(old is not None and
                                                           old.targets_all))
    why = {r["name"]: r["reason"] for r in rows}
    for u in cov.unquantized:
        mod = u.name.rpartition(".")[0]
        if mod in gone:
            u.kind = "unreached"
            u.reason = (f"{why[mod]}; left in float: its static activation quantizers saw no "
                        f"calibration data (declared by adapter {fam}; feed it in forward_loop "
                        "to quantize it)")
    report.coverage = cov


__all__ = ["declared", "kv_outside_decoder", "release", "starving", "unswap",
           "update_report"]
