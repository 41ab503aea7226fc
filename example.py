"""Chat with Qwen3-0.6B: two prompts through the chat template, sampled at temperature 0.6.

Without ~/huggingface/Qwen3-0.6B/ (and no --model), it runs the small model that ships with the project
(assets/tiny-qwen3-stdlib: 6.8M parameters trained on the Python standard library's source, on CPU in seconds) and
says so, with the command that downloads the real one.
"""
import argparse
import os
import sys

from nanovllm import LLM, SamplingParams

DEFAULT_MODEL = os.path.expanduser("~/huggingface/Qwen3-0.6B/")
TINY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-qwen3-stdlib")
QWEN_PROMPTS = ["introduce yourself", "list all prime numbers within 100"]
TINY_PROMPTS = ["What does `os.path.join(a, *p)` do?", "What does `json.dumps(obj)` do?",
                "What does `collections.Counter.most_common(self, n=None)` do?"]
DOWNLOAD_HINT = ("Download Qwen3-0.6B with:\n"
                 "    huggingface-cli download Qwen/Qwen3-0.6B --local-dir ~/huggingface/Qwen3-0.6B/\n"
                 "(huggingface_hub >= 1.0 names the command `hf`: hf download Qwen/Qwen3-0.6B --local-dir ...)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"a local Hugging Face checkpoint directory (default: "
                        f"{DEFAULT_MODEL}, else the shipped tiny model)")
    return parser.parse_args(argv)


def missing_model_message(path: str) -> str:
    return (f"model directory {path!r} not found (or it has no config.json).\n{DOWNLOAD_HINT}\n"
            "or pass another local checkpoint directory: python example.py --model /path/to/model")


def has_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path, prompts = os.path.expanduser(args.model or DEFAULT_MODEL), QWEN_PROMPTS
    if args.model is not None and not has_checkpoint(path):
        print(missing_model_message(path), file=sys.stderr)
        return 1
    if args.model is None and not has_checkpoint(path):
        print(f"{DEFAULT_MODEL} not found: running the SMALL TRAINED MODEL shipped with nano-vllm ({TINY_MODEL}, "
              "6.8M parameters, trained on the Python standard library; it writes Python-flavoured text, not answers)."
              f"\n{DOWNLOAD_HINT}\n", file=sys.stderr)
        path, prompts = TINY_MODEL, TINY_PROMPTS
    llm = LLM(path, enforce_eager=True, tensor_parallel_size=1)
    sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
               for prompt in prompts]
    outputs = llm.generate(prompts, sampling_params)

    for prompt, output in zip(prompts, outputs, strict=True):
        print("\n")
        print(f"Prompt: {prompt!r}")
        print(f"Completion: {output['text']!r}")
    llm.exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
