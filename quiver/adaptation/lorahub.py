"""LoraHub: one weight per library expert, found by a gradient-free search on a few examples.

Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", https://arxiv.org/abs/2307.13269. For weights w (E,) the experts' factors are
combined, A's and scaled B's separately (as LoraHub composes its modules),

    A_w = sum_e w_e A_e,   B_w = sum_e w_e s_e B_e,   update = B_w A_w

and w minimises, over at most `shots` examples of the task,

    L(w) = mean target cross-entropy of the model with (A_w, B_w) + l1 * sum_e |w_e|

with each w_e in [-bound, bound], starting from w = 0 (the base model) with CMA-ES's step
size sigma = 0.5 (a third of the bound: quiver's choice), for a budget of loss evaluations.
LoraHub's defaults: l1 = 0.05, bound 1.5, budget 40. LoraHub searches with nevergrad's NGOpt,
a selector that picks an optimiser from the budget, the dimension and the parametrisation
(CMA-ES among its choices for continuous bounded problems); nevergrad is not installable
here, so quiver uses CMA-ES from `cma` (pycma, maintained by CMA-ES's author) directly,
which also makes the search one fixed, seeded algorithm. The start w = 0 is the first
evaluation, so the result is never worse (in L) than the base model; the weights of the
best evaluation are kept (not a model-based recommendation). The result is a plain LoRA
of the experts' rank (no training follows: LoraHub is gradient-free).
"""

from __future__ import annotations

import numpy as np
import torch

from quiver.adaptation.config import AdaptConfig
from quiver.adaptation.polylib import check_same_shapes
from quiver.adaptation.starts import Factors, peft_lora_weights, scaled_factors
from quiver.data.batching import tokenize_example
from quiver.training import TrainConfig, _LoraAdapter, mean_target_loss


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
    import cma

    check_same_shapes(experts, "lorahub")
    stacks = stack_experts(experts)
    rank = experts[0].adapter_config["r"]
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in stacks}))
    data = [tokenize_example(tokenizer, e, train_config.max_length) for e in examples]
    plain = TrainConfig(rank=rank, alpha=float(rank), dropout=0.0, target_modules=targets)
    adapter = _LoraAdapter(model, plain)  # scaling 1: the combined B carries the s_e
    history: list[dict] = []
    try:
        adapter.eval()

        def objective(weights) -> float:
            adapter.load_weights(peft_lora_weights(combine(stacks, weights)))
            loss = mean_target_loss(adapter.causal_lm, data, tokenizer.pad_token_id,
                                    train_config.batch_size * 2)
            value = loss + config.lorahub_l1 * float(np.abs(weights).sum())
            history.append({"weights": [float(w) for w in weights], "loss": loss,
                            "objective": value})
            return value

        _cma_search(objective, len(experts), config, train_config.seed)
    finally:
        adapter.remove()
    best = min(history, key=lambda h: h["objective"])
    record = {"weights": dict(zip([e.name for e in experts], best["weights"], strict=True)),
              "loss": best["loss"], "objective": best["objective"],
              "evaluations": [h["objective"] for h in history],
              "l1": config.lorahub_l1, "bound": config.lorahub_bound,
              "budget": config.lorahub_budget, "sigma": config.lorahub_sigma,
              "optimiser": f"cma {cma.__version__} (CMA-ES)"}
    return combine(stacks, best["weights"]), record


def _cma_search(objective, dimensions: int, config: AdaptConfig, seed: int) -> None:
    """Evaluate `objective` at w = 0, then at CMA-ES's candidates, `lorahub_budget` times in
    all (a last generation is cut short rather than overrun the budget)."""
    import cma

    numpy_state = np.random.get_state()  # cma seeds numpy's global generator: put it back
    try:
        start = [0.0] * dimensions
        objective(np.asarray(start))
        evaluations = 1
        search = cma.CMAEvolutionStrategy(start, config.lorahub_sigma, {
            "bounds": [-config.lorahub_bound, config.lorahub_bound],
            "seed": seed + 1,  # cma takes 0 as "seed from the clock"
            "verbose": -9})
        while evaluations < config.lorahub_budget:
            candidates = search.ask()[:config.lorahub_budget - evaluations]
            values = [objective(np.asarray(x)) for x in candidates]
            evaluations += len(values)
            if len(values) < search.popsize:
                break  # a generation cut short by the budget cannot be told
            search.tell(candidates, values)
    finally:
        np.random.set_state(numpy_state)
