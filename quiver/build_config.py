"""How to build a library (`BuildConfig`): the strategy, and where and how its trainings run.
Imports no torch: the command line reads its fields for options and help."""

from __future__ import annotations

from dataclasses import dataclass, field

from quiver.transforms.config import SPACES

STRATEGIES = ("private", "shared", "mbc", "random", "poly", "mhr", "mtl-lora")
ADAPTER_STRATEGIES = ("poly", "mhr", "mtl-lora")  # one entry of a multi-task kind, named so
EXECUTORS = ("local", "ray")
CLUSTER_RECORDS = {"mbc": "mbc", "random": "random"}  # strategy -> name of its clusters record


@dataclass
class BuildConfig:
    """How to build a library: the strategy, and where and how its trainings run."""

    strategy: str = field(default="private", metadata={
        "help": "private (an expert per task), shared (one on all tasks), mbc (an expert per "
                "MBC cluster of the private experts), random (MBC's sizes, random members), "
                "poly or mhr (one entry 'poly' / 'mhr': skills routed per task, all tasks), "
                "mtl-lora (one entry 'mtl-lora': shared A, per-task L_t and mix of B_i)"})
    clusters: int = field(default=0, metadata={
        "help": "mbc, random: the number of clusters K (needed by them, refused by the others)"})
    cluster_seed: int = field(default=0, metadata={
        "help": "mbc, random: seed of k-means and of the random membership"})
    cluster_space: str = field(default="params", metadata={
        "help": "mbc, random: what MBC compares: params (A and B flattened, the paper's) or "
                "update (the updates s B A)"})
    shared_name: str = field(default="shared", metadata={"help": "shared: the expert's name"})
    executor: str = field(default="local", metadata={
        "help": "local (trainings on this machine, --workers at once) or ray (each training "
                "a Ray task)"})
    workers: int = field(default=0, metadata={
        "help": "local: trainings at once, each in its own process with --cpus-per-job "
                "threads (1: one after another in this process, the base model loaded once; "
                "0: on a CPU one per core at one thread each, as memory allows, on a GPU 1)"})
    address: str = field(default="", metadata={
        "help": "ray: address of a running cluster (empty: start a local Ray)"})
    cpus_per_job: float = field(default=1.0, metadata={
        "help": "ray, and local with workers > 1: CPU threads each training holds (with "
                "workers 0, the cores shared out)"})
    gpus_per_job: float = field(default=0.0, metadata={"help": "ray: GPUs each training holds"})
    retries: int = field(default=1, metadata={
        "help": "times a failed training is tried again before it is reported"})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: use {', '.join(STRATEGIES)}")
        if self.executor not in EXECUTORS:
            raise ValueError(f"unknown executor {self.executor!r}: use {', '.join(EXECUTORS)}")
        clustered = self.strategy in CLUSTER_RECORDS
        if clustered and self.clusters < 1:
            raise ValueError(f"strategy {self.strategy} needs a number of clusters K >= 1")
        if not clustered and self.clusters != 0:
            raise ValueError(f"strategy {self.strategy} takes no number of clusters")
        if self.cpus_per_job <= 0 or self.gpus_per_job < 0 or self.retries < 0:
            raise ValueError("cpus_per_job must be positive, gpus_per_job and retries >= 0")
        if self.workers < 0:
            raise ValueError("workers must be at least 1, or 0 for a choice by the machine")
        if self.cluster_space not in SPACES:
            raise ValueError(f"unknown cluster space {self.cluster_space!r}: use "
                             f"{' or '.join(SPACES)}")
