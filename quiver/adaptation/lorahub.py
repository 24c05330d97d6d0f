"""LoraHub: one weight per library expert, found by a gradient-free search on a few examples.

Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", https://arxiv.org/abs/2307.13269. For weights w (E,) the experts' factors are
combined, A's and scaled B's separately (as LoraHub composes its modules),

    A_w = sum_e w_e A_e,   B_w = sum_e w_e s_e B_e,   update = B_w A_w

and w minimises, over at most `shots` examples of the task,

    L(w) = mean target cross-entropy of the model with (A_w, B_w) + l1 * sum_e |w_e|

(on the first `lorahub_examples` shots when that is set: each evaluation costs a forward
pass over them, and a search of one weight per expert needs far fewer examples than N may be)

with each w_e in [-bound, bound], starting from w = 0 (the base model). LoraHub's defaults:
l1 = 0.05, bound 1.5, budget 40. As LoraHub does, the search is nevergrad's NGOpt, a selector
that picks an optimiser from the budget, the dimension and the bounds (for LoraHub's budgets
and a few dozen experts it picks COBYLA); its initial step size sigma is 0.5, a third of the
bound (quiver's choice; nevergrad's default is 1). w = 0 is always scored, so the result
is never worse (in L) than the base model; the weights of the best evaluation are kept
(LoraHub takes the optimiser's recommendation, which for COBYLA is the same point). The
result is a plain LoRA of the experts' rank (no training follows: LoraHub is gradient-free).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from quiver.adaptation.config import AdaptConfig
from quiver.adaptation.polylib import check_same_shapes
from quiver.adaptation.starts import Factors, peft_lora_weights, scaled_factors
from quiver.adapters.lora import LoraAdapter
from quiver.data.batching import tokenize_example
from quiver.training import TrainConfig, mean_target_loss


def combine(stacks: dict[str, tuple[torch.Tensor, torch.Tensor]], weights) -> Factors:
    """`{module: (sum_e w_e A_e, sum_e w_e s_e B_e)}` of stacked factors (E, r, in), (E, out, r)."""
    combined = {}
    for module, (a, b) in stacks.items():
        w = torch.as_tensor(np.asarray(weights), dtype=a.dtype)  # (E,)
        combined[module] = (torch.einsum("e,eri->ri", w, a), torch.einsum("e,eor->or", w, b))
    return combined


def stack_experts(experts) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each module's factors of every expert, stacked:
    `{module: (A (E, r, in), s B (E, out, r))}`."""
    loras = [scaled_factors(e) for e in experts]
    return {m: (torch.stack([lora[m][0] for lora in loras]),
                torch.stack([lora[m][1] for lora in loras])) for m in loras[0]}


def lorahub_search(model, tokenizer, experts, examples, config: AdaptConfig,
                   train_config: TrainConfig) -> tuple[Factors, dict]:
    """Search the experts' weights on `examples` (the task's shots).

    Returns:
        The combined factors `{module: (A_w, B_w)}` (scaling 1) and a record of the search:
        the weights by expert, the loss and objective at them, and every evaluation's
        objective in order.

    Raises:
        QuiverError: no experts, or experts of different ranks or layer sets.
    """
    import nevergrad

    check_same_shapes(experts, "lorahub")
    stacks = stack_experts(experts)
    rank = experts[0].adapter_config["r"]
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in stacks}))
    examples = examples[: config.lorahub_examples or len(examples)]  # each evaluation's cost
    data = [tokenize_example(tokenizer, e, train_config.max_length) for e in examples]
    plain = TrainConfig(rank=rank, alpha=float(rank), dropout=0.0, target_modules=targets)
    adapter = LoraAdapter(model, plain)  # scaling 1: the combined B carries the s_e
    history: list[dict] = []
    losses: dict[tuple[float, ...], float] = {}
    try:
        adapter.eval()

        def objective(weights) -> float:
            key = tuple(float(w) for w in weights)
            if key in losses:  # an optimiser may ask for a point twice: score it once
                loss = losses[key]
            else:
                adapter.load_weights(peft_lora_weights(combine(stacks, weights)))
                loss = losses[key] = mean_target_loss(adapter.causal_lm, data,
                                                      tokenizer.pad_token_id,
                                                      train_config.batch_size * 2)
            value = loss + config.lorahub_l1 * float(np.abs(weights).sum())
            history.append({"weights": list(key), "loss": loss, "objective": value})
            return value

        search_weights(objective, len(experts), config, train_config.seed)
    finally:
        adapter.remove()
    best = min(history, key=lambda h: h["objective"])
    record = {"weights": dict(zip([e.name for e in experts], best["weights"], strict=True)),
              "loss": best["loss"], "objective": best["objective"],
              "evaluations": [h["objective"] for h in history],
              "examples": len(data), "l1": config.lorahub_l1, "bound": config.lorahub_bound,
              "budget": config.lorahub_budget, "sigma": config.lorahub_sigma,
              "optimiser": f"nevergrad {nevergrad.__version__} NGOpt"}
    return combine(stacks, best["weights"]), record


def search_weights(objective, dimensions: int, config: AdaptConfig, seed: int) -> None:
    """Minimise `objective` over [-bound, bound]^dimensions with nevergrad's NGOpt from w = 0,
    asking `lorahub_budget` candidates. NGOpt's first candidate is its start, w = 0; were it
    not, w = 0 is scored before it, once beyond the budget."""
    import nevergrad

    space = nevergrad.p.Array(init=np.zeros(dimensions), lower=-config.lorahub_bound,
                              upper=config.lorahub_bound).set_mutation(sigma=config.lorahub_sigma)
    space.random_state = np.random.RandomState(seed)  # nevergrad's own generator, seeded
    search = nevergrad.optimizers.NGOpt(parametrization=space, budget=config.lorahub_budget)
    try:
        with warnings.catch_warnings():
            # scipy's COBYLA warns that nevergrad's final radius is unset; it picks one itself
            warnings.filterwarnings("ignore", message="COBYLA: Invalid RHOEND")
            for step in range(config.lorahub_budget):
                candidate = search.ask()
                if step == 0 and np.any(candidate.value != 0):
                    objective(np.zeros(dimensions))  # the base model is always a candidate
                search.tell(candidate, objective(candidate.value))
    finally:
        # Scipy-based optimisers (COBYLA) run in a thread that waits for the next `tell` and
        # stops only when the optimiser is freed; after an error the traceback would keep this
        # frame, and so the optimiser, alive, and the waiting thread would hold the process.
        del search
