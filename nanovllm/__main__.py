"""`python -m nanovllm serve MODEL_DIR ...`: the `nanovllm` command."""
from nanovllm.entrypoints.cli import main

if __name__ == "__main__":
    main()
