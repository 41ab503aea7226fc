"""Write the CONFIGS block a `python3 -m benchmarks.gemv_bench --sweep` run printed into nanovllm/kernels/gemv.py.

    python3 -m benchmarks.apply_gemv_sweep LOG
"""
import re
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "nanovllm" / "kernels" / "gemv.py"
HEAD = "CONFIGS: dict[tuple[int, int, int], dict] = {"


def main(log_path: str) -> int:
    found = re.search(re.escape(HEAD) + r"\n(.*?)\n\}", Path(log_path).read_text(), re.S)
    if not found:
        print(f"no CONFIGS block in {log_path}", file=sys.stderr)
        return 1
    source = TARGET.read_text()
    start = source.index(HEAD)
    end = source.index("}\n", start) + 2 if not source[start:].startswith(HEAD + "}") else start + len(HEAD) + 2
    TARGET.write_text(source[:start] + HEAD + "\n" + found.group(1) + "\n}\n" + source[end:])
    print(f"applied {len(found.group(1).splitlines())} config entries to {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
