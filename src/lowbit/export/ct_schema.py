"""compressed-tensors' config vocabulary, taken from the library when it is installed.

lowbit writes compressed-tensors checkpoints without needing the ``compressed-tensors``
package. When it is installed (``pip install lowbit[engines]``), every config is built and
validated with the library's own pydantic models (``QuantizationArgs``,
``QuantizationScheme``, ``QuantizationConfig``) and dumped as its ``ModelCompressor`` writes
``config.json``; its ``CompressionFormat`` enum names the formats, its format inference
(``infer_module_format``) picks each layer's format, and ``KVCacheScaleType`` names the
KV-cache scale tensors. A config the installed release rejects is a ConfigError naming the
layer and the library's complaint.

Without the package the constants and rules below are used; ``tests/export/test_ct_schema.py``
checks that they equal the installed library's (names, formats, inferred formats, and that
the library parses every config written without it to the same models).
"""

from __future__ import annotations

import functools
import importlib.util

from lowbit.errors import ConfigError

# the release the constants below were copied from (written as ``version`` without the package)
CT_VERSION = "0.20.1"
QUANT_METHOD = "compressed-tensors"
STATUS_COMPRESSED = "compressed"
KV_SCALE_NAMES = ("k_scale", "v_scale")  # KVCacheScaleType.KEY / .VALUE
# CompressionFormat values of the formats lowbit writes (name in the enum -> value)
FORMATS = {
    "dense": "dense",
    "int_quantized": "int-quantized",
    "float_quantized": "float-quantized",
    "naive_quantized": "naive-quantized",
    "pack_quantized": "pack-quantized",
    "mixed_precision": "mixed-precision",
    "nvfp4_pack_quantized": "nvfp4-pack-quantized",
    "mxfp4_pack_quantized": "mxfp4-pack-quantized",
    "mxfp8_quantized": "mxfp8-quantized",
}
# QuantizationArgs fields that compressed-tensors (0.20) leaves out of its dump when None
_OMITTED_WHEN_NONE = ("actorder", "block_structure", "scale_dtype", "observer", "zp_dtype")


@functools.cache
def library():
    """The installed ``compressed_tensors`` module, or None when it is not installed.

    An installed package that does not import (a torch it does not support, say) is a
    ConfigError with its error: lowbit never writes a config it could not check."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return None
    try:
        import compressed_tensors
        from compressed_tensors.config import CompressionFormat  # noqa: F401
        from compressed_tensors.quantization import (KVCacheScaleType,  # noqa: F401
                                                     QuantizationArgs, QuantizationConfig,
                                                     QuantizationScheme)
    except Exception as e:  # noqa: BLE001 - any import failure means: cannot validate
        raise ConfigError(f"compressed-tensors is installed but does not import "
                          f"({type(e).__name__}: {e}); fix or uninstall it to export "
                          "compressed-tensors checkpoints") from None
    return compressed_tensors


def version() -> str:
    """The ``version`` written into ``quantization_config``: the installed release's (as its
    own ``ModelCompressor`` writes it), else :data:`CT_VERSION`."""
    ct = library()
    return ct.__version__ if ct is not None else CT_VERSION


def format_name(key: str) -> str:
    """The on-disk name of compression format ``key`` (a ``CompressionFormat`` member name,
    e.g. ``"pack_quantized"`` -> ``"pack-quantized"``)."""
    ct = library()
    if ct is None:
        return FORMATS[key]
    from compressed_tensors.config import CompressionFormat

    return CompressionFormat[key].value


def kv_scale_names() -> tuple[str, str]:
    """Names of the key and value cache scales on an attention module (``k_scale``,
    ``v_scale``: ``KVCacheScaleType``, the names compressed-tensors registers and vLLM
    remaps to ``attn.k_scale``)."""
    if library() is None:
        return KV_SCALE_NAMES
    from compressed_tensors.quantization import KVCacheScaleType

    return KVCacheScaleType.KEY.value, KVCacheScaleType.VALUE.value


@functools.cache
def _packs_like(bits: int, ours) -> bool:
    import torch

    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:  # moved: tests/export/test_compressed_tensors.py imports it
        return True
    g = torch.Generator().manual_seed(bits)
    probe = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (3, 67), generator=g,
                          dtype=torch.int8)
    return torch.equal(pack_to_int32(probe, bits), ours(probe, bits))


def check_int32_packing(bits: int, ours, where: str) -> None:
    """ConfigError when the installed compressed-tensors packs ``bits``-bit codes into its
    int32 words differently from ``ours`` (lowbit's packer, the dense layout of
    compressed-tensors >= 0.18; 0.15-0.17 put whole codes in each word for 3/5/6/7 bits):
    a checkpoint that release would misread is never written."""
    ct = library()
    if ct is not None and not _packs_like(bits, ours):
        raise ConfigError(f"{where}: compressed-tensors {ct.__version__} packs {bits}-bit "
                          "codes per int32 word, not densely as compressed-tensors >= 0.18 "
                          "reads them; upgrade compressed-tensors (pip install -U "
                          "'compressed-tensors>=0.18') or use 2, 4 or 8 bits")


def _library_error(where: str, e: Exception) -> ConfigError:
    first = str(e).strip().splitlines()
    detail = "; ".join(line.strip() for line in first[:3])
    return ConfigError(f"{where}: compressed-tensors {version()} rejects this scheme "
                       f"({detail})")


def quantization_args(fields: dict, where: str) -> dict:
    """``fields`` (``QuantizationArgs`` fields; None ones left out) as compressed-tensors
    dumps them: validated by the installed library's ``QuantizationArgs``, else by lowbit's
    copy of its 0.20 dump rules (None ``actorder``/``block_structure``/``scale_dtype``/
    ``observer``/``zp_dtype`` omitted, ``zp_dtype`` only for asymmetric args)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if library() is None:
        out = dict(fields)
        for k in _OMITTED_WHEN_NONE:
            if out.get(k) is None:
                out.pop(k, None)
        if out.get("symmetric", True):
            out.pop("zp_dtype", None)
        return out
    from compressed_tensors.quantization import QuantizationArgs

    try:
        return QuantizationArgs.model_validate(fields).model_dump(mode="json")
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError and the library's own
        raise _library_error(where, e) from None


def _own_format(weights: dict | None, inputs: dict | None) -> str:
    """compressed-tensors 0.20's format inference (its priority order: MXFP4, MXFP8, NVFP4,
    int-quantized, pack-quantized, float-quantized, naive-quantized) for a Linear."""
    if weights is None:
        return "dense"
    if weights["type"] == "float" and weights.get("group_size") == 32:
        if weights["num_bits"] == 4:
            return "mxfp4_pack_quantized"
        if weights["num_bits"] == 8 and weights.get("scale_dtype") == "torch.uint8":
            return "mxfp8_quantized"
    if weights["type"] == "float" and weights["num_bits"] == 4 and \
            weights.get("group_size") == 16:
        return "nvfp4_pack_quantized"
    if weights["type"] == "int":
        if inputs is not None:
            return "int_quantized"
        return "pack_quantized"
    return "float_quantized" if inputs is not None else "naive_quantized"


def scheme_format(weights: dict | None, inputs: dict | None, outputs: dict | None,
                  where: str) -> str:
    """The compression format (its on-disk name) compressed-tensors gives a ``Linear``
    quantized with these args: the installed library's ``infer_module_format`` when it has
    one, else lowbit's copy of its 0.20 rule."""
    ct = library()
    infer = None
    if ct is not None:
        try:
            from compressed_tensors.compressors.format import infer_module_format as infer
        except ImportError:
            infer = None
    if infer is None:
        return format_name(_own_format(weights, inputs))
    from compressed_tensors.quantization import QuantizationScheme
    from torch import nn

    try:
        scheme = QuantizationScheme(targets=["Linear"], weights=weights,
                                    input_activations=inputs, output_activations=outputs)
        return infer(nn.Linear, scheme).value
    except Exception as e:  # noqa: BLE001
        raise _library_error(where, e) from None


def transform_config(groups: dict[str, dict]) -> dict:
    """``quantization_config.transform_config``: ``{"config_groups": {name: scheme}}`` with
    each scheme (``type``, ``apply`` [``{targets, location, inverse, ignore}``], ``randomize``,
    ``requires_grad``, ``head_dim``, ``precision``) as compressed-tensors' ``TransformConfig``
    dumps it (validated by the installed library; without it, the dict as given with the
    library's 0.20 defaults filled in). ``{}`` for no groups."""
    if not groups:
        return {}
    full = {}
    for name, g in groups.items():
        scheme = {"type": g["type"], "apply": [], "randomize": False, "requires_grad": False,
                  "head_dim": g.get("head_dim"), "precision": "torch.float32"}
        for a in g["apply"]:
            scheme["apply"].append({"targets": list(a["targets"]), "location": a["location"],
                                    "inverse": a.get("inverse", False),
                                    "ignore": list(a.get("ignore", []))})
        full[name] = scheme
    if library() is None:
        return {"config_groups": full}
    from compressed_tensors.transform import TransformConfig

    try:
        return TransformConfig.model_validate({"config_groups": full}).model_dump(mode="json")
    except Exception as e:  # noqa: BLE001
        raise _library_error("transform_config", e) from None


def transform_types() -> tuple[str, ...]:
    """The transform types the installed compressed-tensors registers (``hadamard``,
    ``random-hadamard``, ``random-matrix`` in 0.20); lowbit's copy without the package."""
    if library() is None:
        return ("hadamard", "random-hadamard", "random-matrix")
    from compressed_tensors.transform import TransformFactory

    return tuple(TransformFactory.registered_names())


def builds_random_hadamard(n: int) -> bool:
    """Whether the installed compressed-tensors can build a ``random-hadamard`` transform of
    size ``n`` (``n = m * 2^k`` with ``m`` in its table of known Hadamard orders: 1, 2 and
    the multiples of 4 up to 256 in 0.20); True without the package (nothing to check)."""
    if library() is None:
        return True
    try:
        from compressed_tensors.transform.utils.hadamard import _fetch_hadamard_divisor
        import torch
    except ImportError:
        return True
    return _fetch_hadamard_divisor(n, torch.float32) is not None


def build_config(groups: list[dict], ignore: list[str], kv_cache: dict | None,
                 transform: dict | None = None) -> dict:
    """``config.json``'s ``quantization_config`` as compressed-tensors' ``ModelCompressor``
    writes it: ``version``, ``quant_method``, ``sparsity_config``, ``transform_config`` and
    the dump of a ``QuantizationConfig`` (status ``compressed``).

    ``groups``: one dict per config group with ``targets``, ``weights``,
    ``input_activations``, ``output_activations`` (dumped args or None) and ``format``;
    ``ignore``: module names left in float; ``kv_cache``: the KV-cache args or None;
    ``transform``: :func:`transform_config`'s dict (online rotations), ``{}`` when None.
    The top-level ``format`` is the groups' one format, ``dense`` without groups, else
    ``mixed-precision``."""
    fmts = {g["format"] for g in groups}
    top = fmts.pop() if len(fmts) == 1 else format_name(
        "dense" if not fmts else "mixed_precision")
    config_groups = {f"group_{i}": dict(g) for i, g in enumerate(groups)}
    body = {"config_groups": config_groups, "format": top, "global_compression_ratio": None,
            "ignore": list(ignore), "kv_cache_scheme": kv_cache,
            "quantization_status": STATUS_COMPRESSED}
    ct = library()
    if ct is not None:
        from compressed_tensors.base import (COMPRESSION_VERSION_NAME, QUANTIZATION_METHOD,
                                             QUANTIZATION_METHOD_NAME, SPARSITY_CONFIG_NAME,
                                             TRANSFORM_CONFIG_NAME)
        from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

        body["quantization_status"] = QuantizationStatus.COMPRESSED.value
        try:
            body = QuantizationConfig.model_validate(body).model_dump(
                mode="json", exclude={QUANTIZATION_METHOD_NAME})
        except Exception as e:  # noqa: BLE001
            raise _library_error("quantization_config", e) from None
        return {COMPRESSION_VERSION_NAME: ct.__version__,
                QUANTIZATION_METHOD_NAME: QUANTIZATION_METHOD,
                SPARSITY_CONFIG_NAME: {}, TRANSFORM_CONFIG_NAME: dict(transform or {}),
                **body}
    return {"version": CT_VERSION, "quant_method": QUANT_METHOD, "sparsity_config": {},
            "transform_config": dict(transform or {}), **body}
