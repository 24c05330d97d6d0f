"""How to train an expert: `TrainConfig`, a dataclass that round-trips through JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from quiver.data.task import SplitConfig
from quiver.defaults import ALL_LINEAR

CHECKPOINTING = ("auto", "on", "off")
# How a step is run, not what it computes: left out of the key that matches a saved run to its
# config, so a run stopped for lack of memory can resume with a smaller budget.
MEMORY_FIELDS = ("micro_batch_tokens", "gradient_checkpointing")


@dataclass
class TrainConfig:
    """How to train an expert. Defaults follow the paper (docs/design.md: training defaults)."""

    steps: int = field(default=500, metadata={"help": "optimizer steps (ignored with epochs)"})
    epochs: float = field(default=0.0, metadata={"help": "passes over the data; 0: use steps"})
    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup: float = field(default=0.06, metadata={"help": "fraction of steps of linear warmup"})
    batch_size: int = field(default=8, metadata={"help": "examples per step"})
    max_length: int = field(default=512, metadata={"help": "tokens per example (prompt cut)"})
    target_modules: tuple[str, ...] = field(
        default=(ALL_LINEAR,), metadata={
            "help": "linear layers to adapt, by name (q_proj, c_attn, ...), or all-linear: "
                    "every linear layer of the model but its output head"})
    eval_every: int = field(default=50, metadata={"help": "steps between validations"})
    eval_examples: int = field(default=256, metadata={"help": "validation examples used"})
    seed: int = field(default=0, metadata={"help": "seed for data order, init and dropout"})
    max_train: int = field(default=10_000, metadata={"help": "train examples per task, at most"})
    max_valid: int = field(default=1_000, metadata={"help": "valid examples per task, at most"})
    micro_batch_tokens: int = field(default=0, metadata={
        "help": "padded tokens per forward/backward, at most: a bigger batch runs in parts "
                "(gradient accumulation, the same update); 0: pick from the free memory"})
    gradient_checkpointing: str = field(default="auto", metadata={
        "help": "recompute activations in the backward pass (less memory, slower): on, off, "
                "or auto (on when one example would not fit otherwise)"})

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.rank < 1 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError("rank, batch_size must be positive and max_length at least 8")
        if self.micro_batch_tokens < 0:
            raise ValueError("micro_batch_tokens must be 0 (automatic) or positive")
        if self.gradient_checkpointing not in CHECKPOINTING:
            raise ValueError(f"gradient_checkpointing must be one of {', '.join(CHECKPOINTING)}")
        if self.steps < 1 and self.epochs <= 0:
            raise ValueError("train for at least one step (steps > 0 or epochs > 0)")
        if not self.target_modules:
            raise ValueError("target_modules is empty")

    def split_config(self) -> SplitConfig:
        return SplitConfig(seed=0, max_train=self.max_train, max_valid=self.max_valid)
