"""The benchmarks of honeypotnet, run from the repository root as modules:

    python -m bench.reproduce --quick        # the paper's protocol on real data, 1/10 of the sizes
    python -m bench.robustness --quick       # the thief's counter-measures against the protection
    python -m bench.index                    # rebuild docs/results/README.md's index

The protocol they share (data, resumable units, the pre-answered pool oracle, the report writers and
the common options) is bench.benchlib; each script adds its own options.
"""
