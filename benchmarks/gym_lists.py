"""The task lists of the families benchmark (issue 30), fixed before any held-out score is seen.

The rule that made them, written down before the first held-out evaluation:

1. Training tasks: 24 reasoning-gym generators from 7 of the package's categories, each at
   a small setting (short prompts: at most about 160 tokens with the answer, so a CPU trains
   them in minutes; answers the generator scores itself). Several per family, so that a
   held-out task can have relatives in the library.
2. Relatives by setting: a generator of the training list at a setting no expert trained on
   (more digits, terms, words or longer words): the skill is in the library, the inputs are
   harder.
3. Relatives by family: another generator of a category that has experts (the same kind of
   skill, another task).
4. Strangers: generators of categories with no expert at all (geometry, probability, code).
5. Nothing here was chosen by looking at any model's score on a held-out task; the lists
   were chosen from the generators' descriptions, prompt lengths and answer formats
   (`quiver tasks ls`, `quiver tasks show`).
"""

TRAIN = [
    # arithmetic (7)
    "gym:basic_arithmetic?max_digits=2&max_terms=2",
    "gym:chain_sum?max_digits=2&max_terms=2",
    "gym:products?max_digits=2",
    "gym:gcd?max_value=100",
    "gym:lcm?max_value=50",
    "gym:count_bits?max_n=1000",
    "gym:prime_factorization?max_value=200",
    # algorithmic (7)
    "gym:spell_backward?max_word_len=6",
    "gym:letter_counting?max_words=5",
    "gym:caesar_cipher?max_words=3",
    "gym:base_conversion?max_value=100",
    "gym:sentence_reordering?max_words_in_sentence=6",
    "gym:count_primes?max_n=200",
    "gym:word_sorting?max_words=4",
    # algebra (2)
    "gym:simple_equations?max_terms=2",
    "gym:complex_arithmetic",
    # logic (3)
    "gym:syllogism",
    "gym:aiw",
    "gym:knights_knaves",
    # cognition (2)
    "gym:number_sequence",
    "gym:color_cube_rotation",
    # graphs (2)
    "gym:family_relationships",
    "gym:course_schedule",
    # games (1)
    "gym:maze",
]

RELATIVES_BY_SETTING = [
    "gym:chain_sum?max_digits=3&max_terms=3&min_digits=3&min_terms=3",
    "gym:spell_backward?min_word_len=8",  # up to 10 letters, the default
    "gym:letter_counting?max_words=12&min_words=8",
    "gym:products?max_digits=3&min_digits=3",
]

RELATIVES_BY_FAMILY = [
    "gym:word_sequence_reversal?max_words=4",  # algorithmic
    "gym:decimal_chain_sum?max_digits=2&max_terms=2&max_decimal_places=2",  # arithmetic
    "gym:leg_counting?max_animals=4",  # arithmetic
    "gym:number_filtering?max_numbers=5",  # algorithmic
]

STRANGERS = [
    "gym:simple_geometry",  # geometry
    "gym:advanced_geometry",  # geometry
    "gym:coin_flip",  # probability
    "gym:bf",  # code
]

HELD_OUT = RELATIVES_BY_SETTING + RELATIVES_BY_FAMILY + STRANGERS


def group_of(task: str) -> str:
    """`relative (setting)`, `relative (family)` or `stranger`, for a task of the lists in any
    spelling of its name (quiver's canonical names order the knobs)."""
    from quiver.data.gym import canonical_name, parse_name

    def canonical(name: str) -> str:
        return canonical_name(*parse_name(name.removeprefix("gym:")))

    for group, tasks in (("relative (setting)", RELATIVES_BY_SETTING),
                         ("relative (family)", RELATIVES_BY_FAMILY), ("stranger", STRANGERS)):
        if canonical(task) in {canonical(t) for t in tasks}:
            return group
    raise KeyError(task)
