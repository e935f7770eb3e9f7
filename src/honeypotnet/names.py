"""Names that both the library and the CLI's option parser use, kept free of torch so that building the parser
(`honeypotnet --help`, a mistyped option) imports nothing heavy: the oracles' output modes and the
active-extraction strategies."""

OUTPUT_MODES = ("probs", "topk", "rounded", "label")  # what a prediction API answers: honeypotnet.oracles
STRATEGIES = ("random", "entropy", "kcenter", "dfal")  # how an active thief picks its queries: honeypotnet.active
