"""What the benchmarks share: the real-data protocol of the paper's measurement and its plumbing.

    common    paths, logging, JSON and report writing, machine description, torch threads
    args      the options every script takes (--out --quick --device --resume --progress --record)
              and the data options (--shared --cifar-root --tin-root --victim-weights)
    data      the data of the protocol: unpacking ../shared, the fixed subsets, the test split
    units     resumable, locked units of work (OUT/<unit>/unit.json keyed by their parameters)
    oracle    PoolOracle: a model's answers to the thief pool computed once, looked up per query
    protocol  Protocol sizes (FULL, QUICK), the "spec" base configuration and Reproduction, the
              pipeline (victim, references, protection + calibration, pool answers, thieves, verification)
    index     docs/results/README.md's index, rebuilt from the result files present
"""
