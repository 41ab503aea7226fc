"""Which Triton kernel variants bench.py builds, and in which phase: engine start-up (init), the warm-up generate,
or the TIMED run. Anything listed under TIMED is compile time inside the measured throughput (a cold first run).

    python3 -m benchmarks.cold_start --model /tmp/q06 [bench.py arguments]

It wraps Triton's JITFunction._do_compile (the per-variant build, or a load from the on-disk cache) and prints one
line per variant: phase, kernel, seconds, the specialisation key (dtypes, 'D' = 16-divisible/aligned).
"""
import os
import runpy
import sys
import time

import triton.runtime.jit as jit

from nanovllm import LLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    phase = {"name": "init"}
    build = jit.JITFunction._do_compile

    def logged(self, *args, **kwargs):
        t = time.perf_counter()
        out = build(self, *args, **kwargs)
        print(f"[{phase['name']}] {self.fn.__name__} {time.perf_counter() - t:.2f}s key={str(args[0])[:300]}",
              flush=True)
        return out

    generate, calls = LLM.generate, [0]

    def phased(self, *args, **kwargs):
        calls[0] += 1
        phase["name"] = "warmup-generate" if calls[0] == 1 else "TIMED"
        return generate(self, *args, **kwargs)

    jit.JITFunction._do_compile = logged
    LLM.generate = phased
    sys.argv = ["bench.py"] + sys.argv[1:]
    runpy.run_path(os.path.join(REPO, "bench.py"), run_name="__main__")


if __name__ == "__main__":
    main()
