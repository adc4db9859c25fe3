"""Registers, spills and shared memory of every Triton kernel variant the engine launches,
compiled for a GPU that need not be here (``_triton_aot``).

Why: a memory-bound kernel that holds 255 registers or spills to the stack runs few warps per
SM; this lists every kernel so such cases show before a GPU run. Each launch is specialised as
the JIT would (aligned pointers, integers divisible by 16): without that, loads are not
vectorised and the figures are not the GPU's (RESULTS.md, "Kernel resources", correction).

    python benchmarks/kernel_resources.py [CAPABILITY=90] [--fp8] [--sass]

``--sass`` adds each kernel's SASS instruction count, its format conversions and its global
loads by width. ``--unspecialised`` compiles without the JIT's specialisations, as this tool did
before 2026-11-30 (its spills then were not the GPU's).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _triton_aot as aot  # noqa: E402


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    cap = int(args[0]) if args else 90
    with aot.recorded_launches() as seen:
        aot.fp8_engine_launches() if "--fp8" in sys.argv else aot.bf16_engine_launches()
    sass = "--sass" in sys.argv
    extra = " SASS instructions | conversions | global loads |" if sass else ""
    print(f"| kernel | constexprs | warps | registers | stack bytes | shared bytes |{extra}  (sm_{cap})")
    print("|---|---|---|---|---|---|" + ("---|---|---|" if sass else ""))
    for fn, sig, const, opts, attrs in seen.values():
        k = aot.compile_launch(fn, sig, const, opts, cap, {} if "--unspecialised" in sys.argv else attrs)
        r = aot.resources(k)
        names = {fn.arg_names[i[0]]: v for i, v in const.items()}
        ptrs = ",".join(t for t in sig.values() if t.startswith("*fp8"))[:20]
        cells = ""
        if sass:
            c = aot.sass_counts(k)
            cells = f" {c['instructions']} | {c['conversions']} | {c['loads']} |"
        print(f"| {fn.__name__} | {names}{' ' + ptrs if ptrs else ''} | {opts.get('num_warps', 4)} | "
              f"{r['registers']} | {r['stack_bytes']} | {r['shared_bytes']} |{cells}", flush=True)


if __name__ == "__main__":
    main()
