"""ShapesWorld, the embedded default: data, scorer, demo models and the `arrag demo` job."""

# What `arrag demo` (and so `make demo`) runs by default: the README's table, 288 images a method (one seed
# of 48 images moves a method's accuracy by about +-0.07, enough to reorder the methods). Kept here, free of
# imports, so the CLI can show them in --help without loading torch.
DEMO_SEEDS, DEMO_SAMPLES = (0, 1, 2), 4

# Each world's tuned settings, on its validation prompts (`python -m arrag.demo.tune [--world tail]`; docs/demo.md).
# ShapesWorld: lambda 0.1 is also the library default. Sampling is Janus-Pro's own: on validation a higher CFG
# (7.5-10) scored higher for the base only within noise, at a worse realism FID.
DEMO_DAID = {"daid_lambda": 0.1, "daid_tau": 1.0, "daid_k": 256}
DEMO_FAID_K = 10
DEMO_SAMPLING = {"cfg_weight": 5.0, "temperature": 1.0}
# TailWorld: its database is indexed with the wider causal "2hop" neighbourhood (12 cells, two rows up and two
# columns left), which the pilots measured at 3x the L's gain on tail images; p_ret sums the weights of every hit
# proposing a code ("sum": above "nearest" with the L, level with it with the 2hop). docs/demo.md, "TailWorld".
TAIL_DAID = {"daid_lambda": 0.3, "daid_tau": 0.03, "daid_k": 256, "daid_aggregate": "sum"}
TAIL_FAID_K = 10
TAIL_SAMPLING = {"cfg_weight": 5.0, "temperature": 1.0}
# TailWorld's completion table: the real top rows of codes given (of 16), the rest drawn. 5 rows: DAiD's largest
# tail gain over the base on validation (bench/daid_prefix.py at 0, 5 and 7 rows; docs/demo.md).
TAIL_COMPLETION_ROWS = 5
