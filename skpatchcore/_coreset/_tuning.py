"""The tuned constants of the greedy coreset's engine, with the measurements behind them.

Each module of the engine reads them from here when it runs (``tuning.NAME``),
so a test can change one in one place. Sizes were measured on the project's
2-core benchmark machine; none of them changes a result, only time and memory
(the selected indices are the plain loop's whatever their values).
"""

# Smallest safety margins of the batched bound (see bounds.candidates); both grow with
# the dimension d. SLACK is relative to a point's running distance; GAMMA,
# relative to (|x| + |y|)^2, covers float32 rounding of the bound, at most
# 1.25 (d + 2) u (1 + gamma) of that scale (u = 2^-24): gamma is
# max(GAMMA, 4 (d + 2) u), which for d = 128 leaves 2.6 times that.
SLACK = 1e-4
GAMMA = 5e-5
# The farthest BATCH_WIDTH points form a batch, out of which the next picks are
# found. Bound rows are made for up to BLOCK_ROWS picks at a time (all of a
# batch's, as BATCH_WIDTH <= BLOCK_ROWS), against as many points at a time as
# fill PRODUCT_FLOATS (4096 for a full block); the start bounds take
# CHUNK_POINTS points at a time. So the products read the points once per batch
# rather than once per 64 picks: on 2 cores, 21% less time at 1% of 235,000
# vectors of 256 dims, 10-23% at 10% of 96,000 Magnetic Tile vectors, 0-10% at
# 10% of MPDD's 42,336 (runs differ). (Twice the buffer, 16 MB, saved another
# 2.5% on Magnetic Tile but its temporaries raised the selection's peak over its
# input at MPDD 10% by 24 MB, the fit's by ~35 MB.)
BATCH_WIDTH = 512
BLOCK_ROWS = 512
# The bound's rows (the centred points and two columns, see bounds.Rows) are kept whole
# up to this size; beyond, they are made from the points a block of this many
# bytes at a time whenever read (2 MB blocks took 40% longer than kept rows on
# MPDD at 1%: 11 products a batch, each with its own listing; 8 MB, 12%).
KEEP_ROWS_BYTES = 64 << 20
STREAM_BYTES = 8 << 20
PRODUCT_FLOATS = 512 * 4096
CHUNK_POINTS = 65536
# Exact distances to one centre are computed in blocks of this many rows, one
# block per thread, and exact distances of (point, centre) pairs in pieces of
# PAIR_BLOCK pairs.
# Candidate pairs are bounded PAIR_CHUNK at a time, so the float64 temporaries
# stay small however many candidates a range of points has.
ROW_BLOCK = 4096
PAIR_BLOCK = 1024
PAIR_CHUNK = 65536
# The log of waiting distances is pruned (and if need be worked out) once it
# holds this many entries per point.
LOG_POINTS = 2
# Data whose largest norm (after centring) lies in this range is not rescaled.
UNSCALED_RANGE = (2.0**-16, 2.0**16)
# The bound's products may run in bfloat16 (float32 sums) where the CPU multiplies
# bfloat16 in hardware (AMX or AVX512-BF16) and passes the check of
# utils._bf16.bf16_sums_in_float32: 4x the float32 rate on our 2-core Xeon (AMX). Their margins
# are wider (see bounds.LowBound), so more pairs are listed and worked out: faster on
# real patch features, slower on tight clusters. So exact.Chooser times both, batch by
# batch, once LOW_AFTER centres are selected (on fewer, the trial costs more than
# it can save), for batches of at least LOW_MIN_ROWS centres whose margin is
# below LOW_MAX_SPREAD of the squared distances that matter (a batch of tight
# clusters at 1 to 14 took 2 to 7 times as long). LOW_PRECISION None: so;
# True: bfloat16 for every batch; False: float32 (tests force both).
LOW_PRECISION = None
PROBE_EVERY = 4
LOW_MIN_ROWS = 32
LOW_MAX_SPREAD = 0.25
LOW_AFTER = 1000
# The bfloat16 margins' analysis takes gamma below this; it grows with the
# dimension (8e-3 at 128, 0.05 from ~83,500 dimensions on): beyond, float32 only.
LOW_MOST_GAMMA = 0.05
# A centre whose bound cannot rule out more than this fraction of all points is
# checked against every point (blocks of rows, nothing gathered) instead of
# listing the rest of them: early on, when running distances are large, that
# many pairs would fill the log. (Listing is cheaper per point than the exact
# pass, ~45 against ~140 ns: from 0.25 to 0.5, a 1% selection on MPDD took 5%
# less time, 10% on Magnetic Tile's subset 8% less.)
DENSE_FRACTION = 0.5
# A selection continued from fixed centres (partial_fit) starts from each point's
# distance to the nearest centre: with at most PLAIN_CENTRES centres it is
# worked out plainly (one exact pass each); beyond, products of NEAREST_POINTS
# points by NEAREST_CENTRES centres (16 MB) bound the pairs first.
PLAIN_CENTRES = 16
NEAREST_POINTS = 1024
NEAREST_CENTRES = 4096
