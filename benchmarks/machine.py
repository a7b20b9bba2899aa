"""The one description of the machine a benchmark ran on: figures differ a lot between CPUs of one kind."""

from __future__ import annotations

import os


def cpu_description() -> str:
    """The CPU model, core count and widest vector extensions, from /proc/cpuinfo."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags]
    return f"{model}, {os.cpu_count()} cores ({', '.join(vector) or 'no AVX2'})"
