"""Chat with Qwen3-0.6B: two prompts through the chat template, sampled at temperature 0.6."""
import argparse
import os
import sys

from nanovllm import LLM, SamplingParams

DEFAULT_MODEL = os.path.expanduser("~/huggingface/Qwen3-0.6B/")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a local Hugging Face checkpoint directory")
    return parser.parse_args(argv)


def missing_model_message(path: str) -> str:
    return (f"model directory {path!r} not found (or it has no config.json).\n"
            "Download Qwen3-0.6B with:\n"
            "    huggingface-cli download Qwen/Qwen3-0.6B --local-dir ~/huggingface/Qwen3-0.6B/\n"
            "(huggingface_hub >= 1.0 names the command `hf`: hf download Qwen/Qwen3-0.6B --local-dir ...)\n"
            "or pass another local checkpoint directory: python example.py --model /path/to/model")


def main(argv: list[str] | None = None) -> int:
    path = os.path.expanduser(parse_args(argv).model)
    if not os.path.isfile(os.path.join(path, "config.json")):
        print(missing_model_message(path), file=sys.stderr)
        return 1
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    llm = LLM(path, enforce_eager=True, tensor_parallel_size=1)

    sampling_params = SamplingParams(temperature=0.6, max_tokens=256)
    prompts = ["introduce yourself", "list all prime numbers within 100"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
               for prompt in prompts]
    outputs = llm.generate(prompts, sampling_params)

    for prompt, output in zip(prompts, outputs, strict=True):
        print("\n")
        print(f"Prompt: {prompt!r}")
        print(f"Completion: {output['text']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
