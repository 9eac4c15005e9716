"""Signed or unsigned INT8 codes in a CPU engine, chosen for the CPU it is built on.

Our Q/DQ graphs hold symmetric INT8 codes (signed, zero point 0). On an x86 CPU without VNNI
(AVX2 / AVX-512 without VNNI, e.g. AMD Zen 3), ONNX Runtime's MLAS and OpenVINO's oneDNN multiply
u8 x s8 with ``vpmaddubsw``, which adds pairs of products into int16 with saturation: |a0*w0 +
a1*w1| can reach 2 * 255 * 127 > 32767, so an S8 engine silently loses accuracy there (measured on
builtin:digits: engine vs exact Q/DQ emulation 36 dB with ORT, 24 dB with OpenVINO, against
43 / 40 dB with unsigned codes). VNNI's ``vpdpbusd`` accumulates in int32 and does not saturate;
ARM's dot-product kernels do not either.

The same codes shifted by 128 with zero point 128 are exactly the same values
(``(q + 128) - 128 == q``), and u8 x u8 runs on MLAS's exact int16 ``vpmaddwd`` path. So a CPU
engine built on a saturating CPU gets unsigned codes (``to_unsigned``); its manifest records
which (``int8_codes``), and an engine with signed codes is refused on a saturating CPU.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

# CPU flags (Linux /proc/cpuinfo names) whose int8 dot products accumulate without int16 saturation
NON_SATURATING = ("avx512_vnni", "avx_vnni", "amx_int8")
X86 = ("x86_64", "amd64", "i686", "i386")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags, or None where the OS does not list them."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def saturates_signed_int8(machine: str | None = None, flags: set[str] | None = None) -> bool:
    """True on an x86 CPU whose int8 kernels saturate u8 x s8 pair sums (no VNNI). Unknown flags
    (no /proc/cpuinfo) count as not saturating: signed codes, as before."""
    machine = (machine or platform.machine()).lower()
    if machine not in X86:
        return False
    flags = cpu_flags() if flags is None else flags
    return flags is not None and not (set(NON_SATURATING) & flags)


def codes_for_this_cpu() -> str:
    return "unsigned" if saturates_signed_int8() else "signed"


def to_unsigned(model) -> int:
    """In place: every INT8 Q/DQ with zero point 0 becomes UINT8 with zero point 128, and INT8
    initializers that DequantizeLinear reads are shifted by 128. Exactly the same dequantized
    values; returns the number of Q/DQ nodes changed. INT4 and non-zero zero points are left."""
    import onnx
    from onnx import numpy_helper as nh

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    shifted: set[str] = set()
    zps: dict[str, str] = {}  # int8 zero point -> its uint8 twin
    changed = 0

    def zero_int8(name: str) -> bool:
        t = inits.get(name)
        return t is not None and t.data_type == onnx.TensorProto.INT8 and not np.any(nh.to_array(t))

    def twin(name: str | None, shape) -> str:
        key = name or f"zp128_{'x'.join(map(str, shape))}"
        if key not in zps:
            zps[key] = f"{key}__u8"
            g.initializer.append(nh.from_array(np.full(shape, 128, np.uint8), zps[key]))
        return zps[key]

    for n in g.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
        data = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if zp is not None:
            if not zero_int8(zp):
                continue
            shape = nh.to_array(inits[zp]).shape
        elif data is not None and data.data_type == onnx.TensorProto.INT8:
            shape = ()  # a DQ of int8 codes without a zero point: 0 of the codes' type
        else:
            continue
        if data is not None and data.data_type == onnx.TensorProto.INT8 and data.name not in shifted:
            a = nh.to_array(data).astype(np.int16) + 128
            data.CopyFrom(nh.from_array(a.astype(np.uint8), data.name))
            shifted.add(data.name)
        while len(n.input) < 3:
            n.input.append("")
        n.input[2] = twin(zp, shape)
        changed += 1
    used = {i for n in g.node for i in n.input}
    stale = [i for i in g.initializer if i.data_type == onnx.TensorProto.INT8 and i.name not in used]
    for i in stale:  # the replaced int8 zero points
        g.initializer.remove(i)
    # intermediate INT8 tensors are UINT8 now: drop their stale type annotations (ORT re-infers)
    keep = [v for v in g.value_info if v.type.tensor_type.elem_type != onnx.TensorProto.INT8]
    del g.value_info[:]
    g.value_info.extend(keep)
    return changed


def _read(src: Path):
    import onnx

    from saq_deploy.errors import ModelLoadError

    try:
        return onnx.load(str(src))
    except Exception as e:  # protobuf DecodeError, OSError: the file is not an ONNX graph
        raise ModelLoadError(f"could not read ONNX graph '{src}': {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


TMP_SOURCE = ".source-unsigned.onnx"
IN_MEMORY_MAX = 1_900_000_000  # protobuf's 2 GB limit on one serialized message


def source_for_this_cpu(src: Path, tmp: Path) -> tuple[Path | bytes, dict]:
    """(the graph a CPU backend should compile here, the manifest's ``int8_codes`` fields). The
    unsigned graph is handed over in memory (no extra file next to the engine, so a full disk fails
    on the engine file itself); one over 2 GB is written to ``tmp`` until ``drop_source``."""
    if not saturates_signed_int8():
        return Path(src), {"int8_codes": "signed"}
    model = _read(Path(src))
    n = to_unsigned(model)
    codes = {"int8_codes": "unsigned", "int8_codes_note":
             f"{n} Q/DQ nodes as UINT8 with zero point 128: this CPU has no VNNI, where "
             "u8 x s8 int8 kernels saturate (same values, exact kernels)"}
    if model.ByteSize() < IN_MEMORY_MAX:
        return model.SerializeToString(), codes
    import onnx

    onnx.save(model, str(tmp / TMP_SOURCE), save_as_external_data=True, location=f"{TMP_SOURCE}.data")
    return tmp / TMP_SOURCE, codes


def drop_source(tmp: Path) -> None:
    for f in (tmp / TMP_SOURCE, tmp / f"{TMP_SOURCE}.data"):
        f.unlink(missing_ok=True)


def check_codes(path: Path, build: dict, title: str) -> None:
    """One line refusing an engine with signed codes on a CPU where they saturate."""
    from saq_deploy.errors import ModelLoadError

    if build.get("int8_codes", "signed") == "signed" and saturates_signed_int8():
        raise ModelLoadError(f"{title} engine '{path}' holds signed INT8 codes, which saturate on this CPU "
                             "(x86 without VNNI): rebuild it here with saq-deploy build-engine")
