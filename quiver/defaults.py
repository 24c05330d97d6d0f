"""Names the configs default to, importable without torch (the CLI's help shows them)."""

DEFAULT_MODEL = "smollm2-135m"  # SmolLM2-135M-Instruct: the embedded default base model
TINY_MODEL = "tiny-llama"  # a random 2-layer Llama with SmolLM2's tokenizer, for tests
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head
