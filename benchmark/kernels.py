"""Which CPU kernels PyTorch runs: the default (the best the CPU offers) or pinned to AVX2.

ATen, MKL and oneDNN each dispatch to kernels for the CPU's widest vector instruction set, and
kernels for different sets round differently (a reduction split into 16 lanes instead of 8), so
the same run on an AVX2 and an AVX512 machine can differ in the last bits, which DAP-training
and fine-tuning grow. The three libraries can be held to the kernels an AVX2 CPU runs by
environment variables read once, when each library starts: `ATEN_CPU_CAPABILITY=avx2` (ATen's
dispatch, PyTorch's "CPU capability"), `MKL_ENABLE_INSTRUCTIONS=AVX2` (the widest code path MKL
may dispatch to) and `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN's ISA limit). So set, a 2-core AVX512 AMD
EPYC pretrains syn6's θ0 bit for bit as the AVX2 AMD EPYC that made the committed tables
(ca5e9c4d…, 800 steps). `MKL_CBWR=AVX2` (MKL's conditional numerical reproducibility branch)
in its place is not the same: it gives dd00b09c…, a θ0 no machine builds by default. Pinned,
the AVX512 EPYC also reruns the committed syn6 rows `ncl` and `das` seed 2021 (made on the AVX2
EPYC by default) bit for bit in every recorded number, and its DAP steps are not slower (`bench`
on syn6: 0.78x the default's seconds per step for ncl, 0.86x for das, 2026-12-08). So pinning is
the default of the command line on every CPU with AVX2 (`wanted`); `--no-pin-kernels` (or
`CDAP_PIN_KERNELS=0`) runs the CPU's own kernels. It is shown between AMD EPYC machines only
(not yet on Intel CPUs).

The variables must be set before torch is imported, so `python -m benchmark ...` sets them and
starts the process again (`pin_and_reexec`, from `benchmark.__main__.cli`); a caller of
`benchmark.__main__.main` in its own process runs whatever kernels that process started with.
Every result records the setting it ran under (`kernel_setting`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
          "ONEDNN_MAX_CPU_ISA": "AVX2"}
PIN_ENV = "CDAP_PIN_KERNELS"  # "1": as --pin-kernels, "0": as --no-pin-kernels


def pinned(environ: dict[str, str] | None = None) -> bool:
    """Whether all three libraries are held to AVX2 in `environ` (default: this process's)."""
    environ = os.environ if environ is None else environ
    return all(environ.get(k, "").lower() == v.lower() for k, v in PINNED.items())


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether the command line pins the kernels: `CDAP_PIN_KERNELS` "1" or "0" if set, else
    on every CPU with AVX2 (a CPU without it runs no AVX2 kernel to pin to)."""
    environ = os.environ if environ is None else environ
    choice = environ.get(PIN_ENV, "")
    if choice in ("0", "1"):
        return choice == "1"
    return hardware_isa() in ("AVX2", "AVX512")


def hardware_isa() -> str:
    """The widest vector instruction set the CPU has, from /proc/cpuinfo: "AVX512", "AVX2" or
    "other" (the kernel class of an unpinned run; pinning hides it from `get_cpu_capability`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                flags = set(value.split())
                return "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other"
    except OSError:
        pass
    return "other"


def kernel_setting() -> dict[str, Any]:
    """What a result records: the pinning variables as set (None: unset), whether they pin all
    three libraries, the kernel set ATen dispatches to (`get_cpu_capability`) and the CPU's own
    widest set (`hardware_isa`)."""
    import torch

    return {"pinned": pinned(), "env": {k: os.environ.get(k) for k in PINNED},
            "capability": torch.backends.cpu.get_cpu_capability(), "hardware": hardware_isa()}


def pin_and_reexec(argv: list[str]) -> None:
    """Start `python -m benchmark ARGV` again with the AVX2 pinning set, unless it already is
    (then return; the variables were read when torch started). Child processes (`sweep`)
    inherit the variables."""
    if pinned():
        return
    env = {**os.environ, **PINNED}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "benchmark", *argv], env)
